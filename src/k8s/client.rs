//! Reads PVCs and StorageClasses from the Kubernetes API: two GETs per volume setup, with a short,
//! bounded retry on what is transient (connection errors, timeouts, 429, 5xx) and none on what is
//! not (404, 401/403, other 4xx, and a server certificate that fails verification: no retry
//! can fix a kubeconfig).
//!
//! TLS is verified as kubectl (Go's crypto/x509) verifies it: against the kubeconfig's (or the
//! service account's) CA bundle, and a server certificate that is byte-identical to a
//! certificate of that bundle is trusted as it is — the self-signed certificate of a
//! single-node cluster, given as its own CA, which webpki alone refuses (`CaUsedAsEndEntity`).
//! Its names and validity period are still checked, and the handshake still proves that the
//! server holds its key.
//!
//! Why not `kube` + `k8s-openapi`: the hook is a short-lived synchronous process that makes two
//! GETs; `kube` would bring an async runtime, hyper, tower and the generated API types of every
//! Kubernetes group for no behaviour we need. Measured on this project's 2-core machine, a
//! minimal program reading a PVC and a StorageClass: kube 0.98 + k8s-openapi 0.24 + tokio builds
//! clean in release in 88 s into an 8.5 MB binary (130 crates); ureq 2 + rustls in 35 s into
//! 3.5 MB (82 crates). The few fields we read are typed below, and the JSON shapes are exercised
//! against recorded API objects in `integration-tests/hook.rs`.

use super::kubeconfig::ApiTarget;
use crate::error::{Error, ErrorKind, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A PersistentVolumeClaim, as far as jobcachefs reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct Pvc {
    /// Object metadata.
    pub metadata: Meta,
    /// Spec.
    #[serde(default)]
    pub spec: PvcSpec,
}

/// The PVC's spec fields jobcachefs reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PvcSpec {
    /// The class (absent: the cluster's default class was not applied).
    pub storage_class_name: Option<String>,
    /// `Filesystem` or `Block`.
    pub volume_mode: Option<String>,
}

/// A StorageClass, as far as jobcachefs reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct StorageClass {
    /// Object metadata.
    pub metadata: Meta,
    /// The provisioner's name.
    #[serde(default)]
    pub provisioner: String,
    /// Parameters.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
}

/// Object metadata.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Meta {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Namespace (namespaced objects).
    #[serde(default)]
    pub namespace: Option<String>,
    /// UID.
    #[serde(default)]
    pub uid: Option<String>,
    /// Annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The API's `Status` object of a failed request.
#[derive(Debug, Default, Deserialize)]
struct Status {
    #[serde(default)]
    message: String,
}

/// What to do after a failed attempt.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Retry,
    Fail(ErrorKind),
}

/// Pure retry policy: HTTP status → retry or fail (and as what).
fn classify_status(code: u16) -> Next {
    match code {
        404 => Next::Fail(ErrorKind::NotFound),
        408 | 429 | 500..=599 => Next::Retry,
        _ => Next::Fail(ErrorKind::InvalidInput),
    }
}

/// `HTTP <code>: <the Status object's message>` of a refused request.
fn status_message(code: u16, resp: ureq::Response) -> String {
    let status: Status = resp
        .into_string()
        .ok()
        .and_then(|b| serde_json::from_str(&b).ok())
        .unwrap_or_default();
    format!("HTTP {code}: {}", status.message)
}

/// The delay before attempt `n` (1-based, after the first failure): 200 ms doubling, at most 2 s.
fn backoff(n: u32) -> Duration {
    Duration::from_millis(
        200u64
            .saturating_mul(1 << n.min(4).saturating_sub(1))
            .min(2000),
    )
}

/// The longest one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of one API server.
pub struct Client {
    agent: ureq::Agent,
    target: ApiTarget,
    budget: Duration,
}

impl Client {
    /// A client that gives each read at most `budget`, retries included.
    pub fn new(target: ApiTarget, budget: Duration) -> Result<Self> {
        let tls = tls_config(&target)?;
        let agent = ureq::AgentBuilder::new()
            .tls_config(Arc::new(tls))
            .timeout_connect(Duration::from_secs(3))
            .timeout(ATTEMPT_TIMEOUT)
            .build();
        Ok(Client {
            agent,
            target,
            budget,
        })
    }

    /// Reads a PVC.
    pub fn pvc(&self, namespace: &str, name: &str) -> Result<Pvc> {
        self.get(
            &format!("/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}"),
            &format!("PVC {namespace}/{name}"),
        )
    }

    /// Reads a StorageClass.
    pub(crate) fn storage_class(&self, name: &str) -> Result<StorageClass> {
        self.get(
            &format!("/apis/storage.k8s.io/v1/storageclasses/{name}"),
            &format!("StorageClass {name:?}"),
        )
    }

    /// Whether PersistentVolume `name` exists (`Ok(false)`: the API answered 404).
    pub fn pv_exists(&self, name: &str) -> Result<bool> {
        match self.get::<serde_json::Value>(
            &format!("/api/v1/persistentvolumes/{name}"),
            &format!("PV {name}"),
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reads any object as JSON (`Ok(None)`: the API answered 404).
    pub(crate) fn get_value(&self, path: &str, what: &str) -> Result<Option<serde_json::Value>> {
        match self.get::<serde_json::Value>(path, what) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes an object (`POST` to create, `PUT` to replace). A 409 (the object exists, or its
    /// `resourceVersion` is stale) is an error of kind `Conflict`, for the caller to re-read and
    /// retry; transient failures are retried within the budget like reads.
    pub(crate) fn write(
        &self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
        what: &str,
    ) -> Result<serde_json::Value> {
        let text = self.request(method, path, Some((body, "application/json")), what)?;
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }

    /// Applies a JSON merge patch (RFC 7386) to an object. A `metadata.resourceVersion` in the
    /// patch is a precondition: a stale one answers 409, an error of kind `Conflict`.
    pub(crate) fn patch(
        &self,
        path: &str,
        patch: &serde_json::Value,
        what: &str,
    ) -> Result<serde_json::Value> {
        let text = self.request(
            "PATCH",
            path,
            Some((patch, "application/merge-patch+json")),
            what,
        )?;
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str, what: &str) -> Result<T> {
        let body = self.request("GET", path, None, what)?;
        serde_json::from_str(&body).map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!("the API's answer for {what} is not the expected object: {e}"),
            )
        })
    }

    /// One API request (a read without `body`, a write with it), retried on transient failures
    /// within the budget; a certificate that does not verify fails at once. Returns the body.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<(&serde_json::Value, &str)>,
        what: &str,
    ) -> Result<String> {
        let (verb, from) = if body.is_none() {
            ("read", "from")
        } else {
            ("write", "to")
        };
        let url = format!("{}{}", self.target.server, path);
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            // No attempt may outlive the budget: a server that accepts and never answers is
            // given what is left, not a fixed timeout.
            let left = self
                .budget
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(100));
            let mut req = self
                .agent
                .request(method, &url)
                .timeout(left.min(ATTEMPT_TIMEOUT))
                .set("Accept", "application/json");
            if let Some(t) = &self.target.token {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            let sent = match body {
                Some((b, content_type)) => req
                    .set("Content-Type", content_type)
                    .send_string(&b.to_string()),
                None => req.call(),
            };
            let failure = match sent {
                Ok(resp) => {
                    return resp.into_string().map_err(|e| {
                        Error::new(
                            ErrorKind::Unavailable,
                            format!("read the answer for {what} from {url}: {e}"),
                        )
                    });
                }
                Err(ureq::Error::Status(409, _)) if body.is_some() => {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!("{what} changed meanwhile (HTTP 409)"),
                    ))
                }
                Err(ureq::Error::Status(code, resp)) => {
                    let msg = status_message(code, resp);
                    match classify_status(code) {
                        Next::Retry => msg,
                        Next::Fail(ErrorKind::NotFound) => {
                            return Err(Error::new(
                                ErrorKind::NotFound,
                                format!("{what} not found ({msg})"),
                            ))
                        }
                        Next::Fail(kind) => {
                            let hint = match (body, code) {
                                (Some(_), _) if path.contains("/configmaps") => ": check that the provisioner's service account may get, create and update configmaps in its namespace (deploy/rbac.yaml)",
                                (Some(_), _) => ": check that the service account may get and patch it (the RBAC in deploy/)",
                                (None, 401 | 403) => ": check that the service account may get persistentvolumeclaims and storageclasses (deploy/rbac.yaml)",
                                (None, _) => "",
                            };
                            return Err(Error::new(
                                kind,
                                format!("the API refused to {verb} {what} ({msg}){hint}"),
                            ));
                        }
                    }
                }
                Err(ureq::Error::Transport(t)) => {
                    if let Some(cert) = certificate_error(&t) {
                        return Err(Error::invalid(format!(
                        "the Kubernetes API at {} ({}) presented a certificate that does not verify: {}",
                        self.target.server,
                        self.target.origin,
                        explain_certificate_error(&cert, &self.target)
                    )));
                    }
                    t.to_string()
                }
            };
            let pause = backoff(attempt);
            if started.elapsed() + pause >= self.budget {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "could not {verb} {what} {from} the Kubernetes API at {} ({}) after {attempt} attempts in {:.1} s: {failure}; check that the API server is reachable from the node",
                        self.target.server,
                        self.target.origin,
                        started.elapsed().as_secs_f64()
                    ),
                ));
            }
            tracing::warn!(what, attempt, error = %failure, "API {verb} failed; retrying");
            std::thread::sleep(pause);
        }
    }
}

/// The certificate verification failure behind a transport error, if that is what it is.
fn certificate_error(t: &ureq::Transport) -> Option<CertificateError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(t);
    while let Some(e) = cur {
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(c)) = tls {
            return Some(c.clone());
        }
        cur = e.source();
    }
    None
}

/// What is wrong with the server's certificate and how to fix the kubeconfig (pure).
fn explain_certificate_error(e: &CertificateError, target: &ApiTarget) -> String {
    let ca_source = if target.origin.starts_with("service account") {
        "the service account's ca.crt"
    } else {
        "the cluster's certificate-authority-data (or certificate-authority) in the kubeconfig"
    };
    match e {
        CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
            "it is not signed by a CA in {ca_source}; put the cluster's CA there (the one kubectl uses: `kubectl config view --raw --minify`), or the server's own certificate if it is self-signed"
        ),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!(
                "it is not issued for the address in `server` ({}); use a host name or IP address the certificate lists in its subjectAltName",
                target.server
            )
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "it has expired; renew the API server's certificate, or check this node's clock"
                .to_string()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "it is not valid yet; check this node's clock".to_string()
        }
        // webpki's word for a CA certificate presented as the server's: a self-signed server
        // certificate that is not itself in the bundle.
        other if format!("{other:?}").contains("CaUsedAsEndEntity") => format!(
            "it is a self-signed CA certificate, not signed by a CA in {ca_source}; if the API server's certificate is self-signed, put that very certificate there (kubectl accepts it as its own CA)"
        ),
        other => format!(
            "{other:?}; check that {ca_source} is the CA that signed the API server's certificate"
        ),
    }
}

/// Verifies the API server's certificate the way kubectl does (see the module's comment).
#[derive(Debug)]
struct KubeVerifier {
    /// The chain verification against the CA bundle.
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    /// The CA bundle's certificates, trusted as they are when the server presents one of them.
    given: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for KubeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if !self.given.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
            return self.webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            );
        }
        // Trusted by identity, like a leaf found in Go's root pool: its names and dates still
        // have to fit.
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_name(&parsed, server_name)?;
        let (not_before, not_after) = validity(end_entity.as_ref()).ok_or(
            rustls::Error::InvalidCertificate(CertificateError::BadEncoding),
        )?;
        let t = now.as_secs() as i64;
        if t < not_before {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet,
            ));
        }
        if t > not_after {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// One DER element at the start of `d`: (tag, contents, rest).
fn der(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, d) = d.split_first()?;
    let (&first, mut d) = d.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || d.len() < n {
            return None;
        }
        let len = d[..n].iter().fold(0usize, |a, b| (a << 8) | *b as usize);
        d = &d[n..];
        len
    };
    (d.len() >= len).then(|| (tag, &d[..len], &d[len..]))
}

/// Seconds since the epoch of an X.509 UTCTime (tag 0x17) or GeneralizedTime (0x18) in UTC.
fn x509_time(tag: u8, v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    let (year, rest) = match (tag, s.len()) {
        (0x17, 12) => {
            let yy: i64 = s[..2].parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &s[2..])
        }
        (0x18, 14) => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    let n = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (m, d, hh, mm, ss) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + hh * 3600 + mm * 60 + ss)
}

/// A certificate's (notBefore, notAfter), in seconds since the epoch.
fn validity(cert: &[u8]) -> Option<(i64, i64)> {
    let (_, certificate, _) = der(cert)?;
    let (_, mut tbs, _) = der(certificate)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der(tbs)?.2; // [0] version
    }
    let (_, _, rest) = der(tbs)?; // serial
    let (_, _, rest) = der(rest)?; // signature algorithm
    let (_, _, rest) = der(rest)?; // issuer
    let (_, validity, _) = der(rest)?;
    let (t1, v1, rest) = der(validity)?;
    let (t2, v2, _) = der(rest)?;
    Some((x509_time(t1, v1)?, x509_time(t2, v2)?))
}

fn tls_config(target: &ApiTarget) -> Result<rustls::ClientConfig> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        Error::invalid(format!("{what} of {} is unusable: {e}", target.origin))
    };
    let mut roots = rustls::RootCertStore::empty();
    let mut given = Vec::new();
    match &target.ca_pem {
        Some(pem) => {
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                let cert = cert.map_err(|e| bad("the CA bundle", &e))?;
                roots
                    .add(cert.clone())
                    .map_err(|e| bad("the CA bundle", &e))?;
                given.push(cert);
            }
            if given.is_empty() {
                return Err(bad("the CA bundle", &"no PEM certificate in it"));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| bad("the CA bundle", &e))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("the TLS settings", &e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(KubeVerifier { webpki, given }));
    match &target.client_cert {
        Some((cert, key)) => {
            let certs = rustls_pemfile::certs(&mut &cert[..])
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| bad("the client certificate", &e))?;
            let key = rustls_pemfile::private_key(&mut &key[..])
                .map_err(|e| bad("the client key", &e))?
                .ok_or_else(|| bad("the client key", &"no PEM private key in it"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| bad("the client certificate", &e))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_only_what_is_transient() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert_eq!(classify_status(code), Next::Retry, "{code}");
        }
        assert_eq!(classify_status(404), Next::Fail(ErrorKind::NotFound));
        for code in [400, 401, 403, 409, 422] {
            assert_eq!(
                classify_status(code),
                Next::Fail(ErrorKind::InvalidInput),
                "{code}"
            );
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let d: Vec<u64> = (1..8).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(d, [200, 400, 800, 1600, 1600, 1600, 1600]);
    }

    #[test]
    fn x509_times_are_read() {
        assert_eq!(x509_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(x509_time(0x17, b"261125102240Z"), Some(1_795_602_160));
        assert_eq!(x509_time(0x18, b"20261125102240Z"), Some(1_795_602_160));
        assert_eq!(x509_time(0x18, b"20000301000000Z"), Some(951_868_800));
        assert_eq!(x509_time(0x17, b"2611251022Z"), None);
        assert_eq!(validity(b"\x30\x00"), None);
    }

    #[test]
    fn certificate_errors_say_how_to_fix_the_kubeconfig() {
        let kc = ApiTarget {
            server: "https://10.0.0.1:6443".into(),
            origin: "kubeconfig /k, context \"ci\"".into(),
            ..Default::default()
        };
        let m = explain_certificate_error(&CertificateError::UnknownIssuer, &kc);
        assert!(m.contains("certificate-authority-data"), "{m}");
        let m = explain_certificate_error(&CertificateError::NotValidForName, &kc);
        assert!(
            m.contains("https://10.0.0.1:6443") && m.contains("subjectAltName"),
            "{m}"
        );
        let sa = ApiTarget {
            origin: "service account in /var/run/secrets".into(),
            ..kc
        };
        let m = explain_certificate_error(&CertificateError::UnknownIssuer, &sa);
        assert!(m.contains("service account's ca.crt"), "{m}");
    }

    #[test]
    fn recorded_objects_parse() {
        let pvc: Pvc = serde_json::from_str(
            r#"{"kind":"PersistentVolumeClaim","apiVersion":"v1","metadata":{"name":"c","namespace":"ci","uid":"u","annotations":{"jobcachefs.io/cache":"m"}},"spec":{"accessModes":["ReadWriteOnce"],"resources":{"requests":{"storage":"1Gi"}},"storageClassName":"jobcache","volumeMode":"Filesystem"},"status":{"phase":"Pending"}}"#,
        )
        .unwrap();
        assert_eq!(pvc.metadata.annotations["jobcachefs.io/cache"], "m");
        assert_eq!(pvc.spec.storage_class_name.as_deref(), Some("jobcache"));
        let sc: StorageClass = serde_json::from_str(
            r#"{"kind":"StorageClass","apiVersion":"storage.k8s.io/v1","metadata":{"name":"jobcache"},"provisioner":"jobcachefs.io/local-path","parameters":{"jobcachefs.io/write-back":"false"},"reclaimPolicy":"Delete","volumeBindingMode":"WaitForFirstConsumer"}"#,
        )
        .unwrap();
        assert_eq!(sc.parameters["jobcachefs.io/write-back"], "false");
    }
}
