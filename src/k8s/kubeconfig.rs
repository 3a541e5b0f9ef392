//! Where the Kubernetes API is and how to authenticate: from `KUBECONFIG` (or `~/.kube/config`)
//! or, inside a pod, from the service account (token and CA under
//! `/var/run/secrets/kubernetes.io/serviceaccount`). Only static credentials are understood
//! (bearer tokens, token files, client certificates): the hook runs in a helper pod with the
//! provisioner's service account, and exec/auth-provider plugins have no place there.

use crate::error::{Error, IoContext, Result};
use base64::Engine as _;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where the service account's credentials are mounted in a pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// An API server and the credentials to use with it.
#[derive(Clone, Default)]
pub struct ApiTarget {
    /// Base URL, e.g. `https://10.96.0.1:443`.
    pub server: String,
    /// PEM CA bundle to verify the server with; `None`: the public web roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Bearer token.
    pub token: Option<String>,
    /// PEM client certificate and key.
    pub client_cert: Option<(Vec<u8>, Vec<u8>)>,
    /// Where these came from, for error messages.
    pub origin: String,
}

impl std::fmt::Debug for ApiTarget {
    // Never prints credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTarget")
            .field("server", &self.server)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct KubeConfig {
    #[serde(default)]
    clusters: Vec<Named<Cluster>>,
    #[serde(default)]
    users: Vec<Named<User>>,
    #[serde(default)]
    contexts: Vec<Named<Context>>,
    current_context: Option<String>,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "user", alias = "context")]
    value: T,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Cluster {
    server: String,
    certificate_authority: Option<PathBuf>,
    certificate_authority_data: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct User {
    token: Option<String>,
    // kubectl writes `tokenFile` (client-go's AuthInfo is camelCase there, unlike its neighbours).
    #[serde(alias = "tokenFile")]
    token_file: Option<PathBuf>,
    client_certificate: Option<PathBuf>,
    client_certificate_data: Option<String>,
    client_key: Option<PathBuf>,
    client_key_data: Option<String>,
    exec: Option<serde_yaml::Value>,
    auth_provider: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
struct Context {
    cluster: String,
    user: Option<String>,
}

/// Finds the API: `KUBECONFIG` if set, else the pod's service account if running in a pod,
/// else `~/.kube/config`.
pub fn discover() -> Result<ApiTarget> {
    if let Some(v) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        // Like kubectl, several files may be listed; the first one holding a current context
        // is used (merging is not needed for a helper pod).
        let first = std::env::split_paths(&v).next().unwrap_or_default();
        return from_file(&first);
    }
    if let (Ok(host), Ok(port)) = (
        std::env::var("KUBERNETES_SERVICE_HOST"),
        std::env::var("KUBERNETES_SERVICE_PORT"),
    ) {
        // The override exists for tests, which cannot write the real mount point.
        let dir = std::env::var_os("JOBCACHEFS_SERVICE_ACCOUNT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(SERVICE_ACCOUNT_DIR));
        return in_cluster(&host, &port, &dir);
    }
    match std::env::var_os("HOME") {
        Some(home) if Path::new(&home).join(".kube/config").exists() => {
            from_file(&Path::new(&home).join(".kube/config"))
        }
        _ => Err(Error::invalid(
            "no Kubernetes API to ask: run inside a pod with a service account, or set KUBECONFIG",
        )),
    }
}

/// The service account's view of the API.
pub(crate) fn in_cluster(host: &str, port: &str, dir: &Path) -> Result<ApiTarget> {
    let token_path = dir.join("token");
    let token =
        std::fs::read_to_string(&token_path).at("read service account token", &token_path)?;
    let ca_path = dir.join("ca.crt");
    let ca = std::fs::read(&ca_path).at("read service account CA", &ca_path)?;
    // An IPv6 service host needs brackets in a URL.
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    Ok(ApiTarget {
        server: format!("https://{host}:{port}"),
        ca_pem: Some(ca),
        token: Some(token.trim().to_string()),
        client_cert: None,
        origin: format!("service account in {}", dir.display()),
    })
}

/// Reads a kubeconfig file; relative paths in it are relative to its directory.
pub(crate) fn from_file(path: &Path) -> Result<ApiTarget> {
    let text = std::fs::read_to_string(path).at("read kubeconfig", path)?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    parse(&text, dir, &path.display().to_string())
}

fn decode(what: &str, origin: &str, data: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| Error::invalid(format!("{what} in kubeconfig {origin} is not base64: {e}")))
}

/// Reads a file the kubeconfig refers to; an error names both files, since the fix is often in
/// the kubeconfig (a wrong relative path), not in the file it names.
fn read_rel(dir: &Path, p: &Path, what: &str, origin: &str) -> Result<Vec<u8>> {
    let full = dir.join(p);
    std::fs::read(&full).ctx(|| {
        format!(
            "read {what} {} named in kubeconfig {origin}",
            full.display()
        )
    })
}

/// Parses kubeconfig text (`dir` resolves relative file references).
pub fn parse(text: &str, dir: &Path, origin: &str) -> Result<ApiTarget> {
    let kc: KubeConfig = serde_yaml::from_str(text)
        .map_err(|e| Error::invalid(format!("kubeconfig {origin} is invalid: {e}")))?;
    let ctx_name = kc.current_context.clone().unwrap_or_default();
    let ctx = kc
        .contexts
        .iter()
        .find(|c| c.name == ctx_name)
        .map(|c| &c.value)
        .ok_or_else(|| {
            Error::invalid(format!(
                "kubeconfig {origin} has no current context {ctx_name:?}: set current-context"
            ))
        })?;
    let cluster = kc
        .clusters
        .iter()
        .find(|c| c.name == ctx.cluster)
        .map(|c| &c.value)
        .ok_or_else(|| {
            Error::invalid(format!(
                "kubeconfig {origin}: context {ctx_name:?} names cluster {:?}, which is not defined",
                ctx.cluster
            ))
        })?;
    let none = User::default();
    let user = match &ctx.user {
        Some(u) => kc
            .users
            .iter()
            .find(|x| &x.name == u)
            .map(|x| &x.value)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "kubeconfig {origin}: context {ctx_name:?} names user {u:?}, which is not defined"
                ))
            })?,
        None => &none,
    };
    if user.exec.is_some() || user.auth_provider.is_some() {
        return Err(Error::invalid(format!(
            "kubeconfig {origin}: user of context {ctx_name:?} uses an exec or auth-provider plugin, which jobcachefs does not run: give it a token or a client certificate"
        )));
    }
    let ca_pem = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(d), _) => Some(decode("certificate-authority-data", origin, d)?),
        (None, Some(p)) => Some(read_rel(dir, p, "certificate-authority", origin)?),
        (None, None) => None,
    };
    let token = match (&user.token, &user.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(p)) => Some(
            String::from_utf8_lossy(&read_rel(dir, p, "tokenFile", origin)?)
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let cert = match (&user.client_certificate_data, &user.client_certificate) {
        (Some(d), _) => Some(decode("client-certificate-data", origin, d)?),
        (None, Some(p)) => Some(read_rel(dir, p, "client-certificate", origin)?),
        (None, None) => None,
    };
    let key = match (&user.client_key_data, &user.client_key) {
        (Some(d), _) => Some(decode("client-key-data", origin, d)?),
        (None, Some(p)) => Some(read_rel(dir, p, "client-key", origin)?),
        (None, None) => None,
    };
    let client_cert = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => {
            return Err(Error::invalid(format!(
                "kubeconfig {origin}: a client certificate needs both client-certificate and client-key"
            )))
        }
    };
    Ok(ApiTarget {
        server: cluster.server.trim_end_matches('/').to_string(),
        ca_pem,
        token,
        client_cert,
        origin: format!("kubeconfig {origin}, context {ctx_name:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KC: &str = r#"
apiVersion: v1
kind: Config
current-context: ci
clusters:
- name: c1
  cluster:
    server: https://127.0.0.1:6443/
    certificate-authority-data: aGVsbG8=
contexts:
- name: ci
  context:
    cluster: c1
    user: u1
    namespace: default
users:
- name: u1
  user:
    token: " abc "
"#;

    #[test]
    fn parses_token_kubeconfig() {
        let t = parse(KC, Path::new("/"), "t").unwrap();
        assert_eq!(t.server, "https://127.0.0.1:6443");
        assert_eq!(t.ca_pem.as_deref(), Some(&b"hello"[..]));
        assert_eq!(t.token.as_deref(), Some("abc"));
        assert!(t.client_cert.is_none());
        assert!(
            !format!("{t:?}").contains("abc"),
            "Debug must not print the token"
        );
    }

    #[test]
    fn token_file_relative_to_the_kubeconfig() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("tok"), "xyz\n").unwrap();
        // kubectl's spelling, and the kebab-case one this module used to require.
        for key in ["tokenFile", "token-file"] {
            let kc = KC.replace("token: \" abc \"", &format!("{key}: tok"));
            let t = parse(&kc, d.path(), "t").unwrap();
            assert_eq!(t.token.as_deref(), Some("xyz"), "{key}");
        }
    }

    #[test]
    fn rejects_what_it_cannot_use() {
        for (from, to, needle) in [
            (
                "current-context: ci",
                "current-context: nope",
                "no current context",
            ),
            ("cluster: c1\n", "cluster: c2\n", "cluster \"c2\""),
            ("token: \" abc \"", "exec: {command: aws}", "exec"),
            ("aGVsbG8=", "not*base64", "base64"),
            ("token: \" abc \"", "client-key-data: aGVsbG8=", "both"),
        ] {
            let text = KC.replace(from, to);
            assert_ne!(text, KC, "{from}");
            let e = parse(&text, Path::new("/"), "t")
                .err()
                .unwrap_or_else(|| panic!("{from} accepted"));
            assert!(e.to_string().contains(needle), "{from}: {e}");
        }
    }

    #[test]
    fn in_cluster_reads_the_service_account() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("token"), "t0k\n").unwrap();
        std::fs::write(d.path().join("ca.crt"), "CA").unwrap();
        let t = in_cluster("fd00::1", "443", d.path()).unwrap();
        assert_eq!(t.server, "https://[fd00::1]:443");
        assert_eq!(t.token.as_deref(), Some("t0k"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use serde_yaml::Value;

    /// Modest case counts; nothing written into the source tree on failure.
    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    const ORIGIN: &str = "/home/u/.kube/KCFILE";

    /// Keys a kubeconfig has, and a few it does not.
    const KEYS: &[&str] = &[
        "apiVersion",
        "kind",
        "current-context",
        "clusters",
        "users",
        "contexts",
        "name",
        "cluster",
        "user",
        "context",
        "server",
        "certificate-authority",
        "certificate-authority-data",
        "token",
        "token-file",
        "tokenFile",
        "client-certificate",
        "client-certificate-data",
        "client-key",
        "client-key-data",
        "exec",
        "auth-provider",
        "namespace",
        "x",
    ];

    /// Scalars: names that match each other often, base64 and not, numbers, nulls. No '/':
    /// file references stay inside the test's temporary directory.
    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            "(c1|u1|ci|tok|ca|aGVsbG8=|not\\*b64|https://h:1/|)".prop_map(Value::from),
            "[a-zA-Z0-9 .:=-]{0,12}".prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            Just(Value::Null),
        ]
    }

    fn yaml() -> impl Strategy<Value = Value> {
        scalar().prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Sequence),
                prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                    Value::Mapping(kv.into_iter().map(|(k, v)| (Value::from(k), v)).collect())
                }),
            ]
        })
    }

    /// A kubeconfig whose context, cluster and user mostly resolve, with random credentials
    /// (file references to a file that exists, or not), so that parsing gets past the shape.
    fn near_valid() -> impl Strategy<Value = Value> {
        let field = (
            prop::sample::select(&KEYS[11..22]),
            prop_oneof![
                Just(Value::from("tok")),
                Just(Value::from("missing")),
                scalar()
            ],
        );
        (
            prop::collection::vec(field.clone(), 0..4),
            prop::collection::vec(field, 0..4),
            "(c1|c2)",
            prop::option::of("(u1|u2)"),
        )
            .prop_map(|(cluster, user, cname, uname)| {
                let map = |kv: Vec<(&str, Value)>| {
                    Value::Mapping(kv.into_iter().map(|(k, v)| (Value::from(k), v)).collect())
                };
                let mut cluster = cluster;
                cluster.push(("server", Value::from("https://h")));
                let mut context = vec![("cluster", Value::from(cname))];
                if let Some(u) = uname {
                    context.push(("user", Value::from(u)));
                }
                let named = |name: &str, key: &str, v: Value| {
                    Value::Sequence(vec![map(vec![("name", Value::from(name)), (key, v)])])
                };
                map(vec![
                    ("current-context", Value::from("ci")),
                    ("clusters", named("c1", "cluster", map(cluster))),
                    ("contexts", named("ci", "context", map(context))),
                    ("users", named("u1", "user", map(user))),
                ])
            })
    }

    /// Text that is YAML of a kubeconfig's shape, cut or with a byte changed, or anything.
    fn yamlish() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => (prop_oneof![yaml(), near_valid()], any::<prop::sample::Index>(), 0u8..4, "[\\x00-\\x7f]")
                .prop_map(|(v, at, how, c)| {
                    let mut t = serde_yaml::to_string(&v).unwrap();
                    let i = at.index(t.len() + 1);
                    let i = (0..=i).rev().find(|i| t.is_char_boundary(*i)).unwrap_or(0);
                    match how {
                        0 => t.truncate(i),
                        1 => t.insert_str(i, &c),
                        _ => {}
                    }
                    t
                }),
            1 => any::<String>(),
            1 => "[a-z:\\- \n\t\"'{}\\[\\],|>&*!#%@`]{0,200}",
        ]
    }

    /// A well-formed kubeconfig of random names, a token, CA data and a server.
    fn valid() -> impl Strategy<Value = (String, String, String, Vec<u8>, String)> {
        (
            "[a-z][a-z0-9-]{0,10}",
            "[a-z][a-z0-9-]{0,10}",
            "[A-Za-z0-9._-]{1,40}",
            prop::collection::vec(any::<u8>(), 0..64),
            "https://[a-z0-9.-]{1,20}(:[0-9]{1,5})?",
        )
    }

    proptest! {
        #![proptest_config(config(256))]

        /// Any text: a target or an error, never a panic; every error names the kubeconfig.
        #[test]
        fn yamlish_text_never_panics_and_errors_name_the_file(text in yamlish()) {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join("tok"), "t0k\n").unwrap();
            if let Err(e) = parse(&text, d.path(), ORIGIN) {
                prop_assert!(e.to_string().contains(ORIGIN), "{e}");
            }
        }

        /// What a well-formed kubeconfig says comes back as written.
        #[test]
        fn a_valid_kubeconfig_round_trips((ctx, cluster, token, ca, server) in valid()) {
            use base64::Engine as _;
            let ca64 = base64::engine::general_purpose::STANDARD.encode(&ca);
            let text = format!(
                "current-context: {ctx}\nclusters:\n- name: {cluster}\n  cluster:\n    server: {server}/\n    certificate-authority-data: \"{ca64}\"\ncontexts:\n- name: {ctx}\n  context:\n    cluster: {cluster}\n    user: u\nusers:\n- name: u\n  user:\n    token: \"{token}\"\n"
            );
            let t = parse(&text, Path::new("/nonexistent"), ORIGIN).unwrap();
            prop_assert_eq!(t.server, server);
            prop_assert_eq!(t.token, Some(token));
            prop_assert_eq!(t.ca_pem, Some(ca));
            prop_assert!(t.client_cert.is_none());
        }
    }
}
