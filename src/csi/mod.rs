//! The CSI plugin: `jobcachefs csi --endpoint unix:///csi/csi.sock --node-id NODE
//! [--controller]`, the second Kubernetes front end beside the provisioner hook (see
//! docs/src/design.md, "The CSI front end").
//!
//! kubelet calls NodePublishVolume when a pod starts on the node and NodeUnpublishVolume as
//! soon as its containers have exited: each publish is one job volume at the target path, each
//! unpublish its delete (commit or discard), with the engine's records and crash rules. There
//! is no helper pod and the write-back lands when the build ends.
//!
//! - [`identity`], [`node`], [`controller`]: one file per CSI service, each a thin adapter: it
//!   checks the request's fields, asks [`crate::k8s::policy`] for the decision (the same rules
//!   as the hook) and calls the engine. The spec's types stop there.
//! - [`status`]: the one mapping of library errors to the spec's status codes.
//! - [`authority`] (with [`hpack`]): every connection's header blocks read before h2 does, so
//!   that clients which send the socket path as `:authority` (grpcio, grpc-java, csc) work.
//!
//! The engine is blocking; every call runs on tokio's blocking pool, so publishes of many pods
//! wait only for the engine's own short locks, never for each other's I/O.

// tonic's Status is large (176 bytes), and it is what every service method must return: boxing
// it in the helpers would only be unboxed again at the trait's edge.
#![allow(clippy::result_large_err)]

mod authority;
pub mod controller;
mod hpack;
pub mod identity;
pub mod node;
pub mod status;

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::Engine;
use bpfman_csi::v1 as csi;
use std::path::{Path, PathBuf};

/// The driver's name (the CSIDriver object's and every StorageClass's `provisioner`).
pub const DRIVER_NAME: &str = "csi.jobcachefs.io";

/// The topology key of the node a volume lives on.
pub const TOPOLOGY_NODE: &str = "topology.csi.jobcachefs.io/node";

/// How `jobcachefs csi` runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// `unix:///path/to/csi.sock` (or a plain absolute path).
    pub endpoint: String,
    /// This node's name, as Kubernetes knows it.
    pub node_id: String,
    /// Also serve the Controller service (CreateVolume/DeleteVolume for PVCs).
    pub controller: bool,
}

/// Bytes of a unix socket path (`sun_path` less its NUL).
pub const SOCKET_PATH_MAX: usize = 107;

/// The socket path of a CSI endpoint.
pub fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    let p = Path::new(path);
    if !p.is_absolute() || p.file_name().is_none() {
        return Err(Error::invalid(format!(
            "CSI endpoint {endpoint:?} is not a unix socket path: use unix:///ABSOLUTE/PATH (e.g. unix:///csi/csi.sock)"
        )));
    }
    // `sockaddr_un.sun_path` holds 108 bytes, its NUL included: a longer path cannot be bound
    // (or, by tools that copy it unchecked, is cut and binds somewhere else).
    if path.len() > SOCKET_PATH_MAX {
        return Err(Error::invalid(format!(
            "CSI endpoint {endpoint:?} is a path of {} bytes; a unix socket path holds at most \
             {SOCKET_PATH_MAX}: mount the socket's directory at a shorter path (e.g. unix:///csi/csi.sock)",
            path.len()
        )));
    }
    Ok(p.to_path_buf())
}

/// Checks the node id (it becomes a topology value and a label value).
pub fn check_node_id(node_id: &str) -> Result<()> {
    crate::input::names::validate_subdomain("node id", node_id).map_err(|e| {
        Error::invalid(format!(
            "{e}: pass the node's Kubernetes name (--node-id or KUBE_NODE_NAME, from spec.nodeName)"
        ))
    })
}

/// Removes a socket a previous plugin left; refuses when a live plugin still serves it.
fn replace_stale_socket(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !md.file_type().is_socket() {
        return Err(Error::invalid(format!(
            "CSI endpoint {} exists and is not a socket: remove it or pick another --endpoint",
            path.display()
        )));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "CSI endpoint {} is served by a running plugin: stop it first (one plugin per socket)",
                path.display()
            ),
        ));
    }
    tracing::info!(socket = %path.display(), "replacing the stale socket of a previous plugin");
    std::fs::remove_file(path).at("remove stale socket", path)
}

/// Serves the CSI services on the endpoint until SIGTERM or SIGINT, then stops accepting calls,
/// lets the calls in flight finish (a commit is never cut), and removes the socket.
pub fn serve(engine: Engine, opts: Options) -> Result<()> {
    check_node_id(&opts.node_id)?;
    let path = socket_path(&opts.endpoint)?;
    if let Some(parent) = path.parent() {
        crate::state::fsutil::ensure_dir(parent)?;
    }
    replace_stale_socket(&path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("csi")
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the CSI server's runtime", e))?;
    let result = runtime.block_on(run(engine, opts, path.clone()));
    // Dropping the runtime waits for the engine calls still running on its blocking pool.
    drop(runtime);
    let _ = std::fs::remove_file(&path);
    tracing::info!("CSI plugin stopped");
    result
}

async fn run(engine: Engine, opts: Options, path: PathBuf) -> Result<()> {
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| Error::io(format!("listen on {}", path.display()), e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        // kubelet and the registrar run as root; nobody else talks to the plugin.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
            .at("chmod", &path)?;
    }
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::UnixListenerStream::new(listener),
        |conn| conn.map(authority::Repaired::new),
    );
    let shared = std::sync::Arc::new(node::Plugin::new(engine, opts.node_id.clone()));
    let controller = opts.controller.then(|| {
        csi::controller_server::ControllerServer::new(controller::Controller::new(shared.clone()))
    });
    tracing::info!(
        socket = %path.display(),
        node = %opts.node_id,
        controller = opts.controller,
        version = env!("CARGO_PKG_VERSION"),
        "CSI plugin {DRIVER_NAME} serving"
    );
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: finishing the calls in flight, then stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: finishing the calls in flight, then stopping"),
        }
    };
    tonic::transport::Server::builder()
        .add_service(csi::identity_server::IdentityServer::new(
            identity::Identity::new(opts.controller),
        ))
        .add_service(csi::node_server::NodeServer::new(node::NodeService(shared)))
        .add_optional_service(controller)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("CSI server on {}: {e}", path.display()),
            )
        })
}

/// Runs blocking engine work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, tonic::Status> + Send + 'static,
) -> std::result::Result<T, tonic::Status> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(tonic::Status::internal(format!(
            "the call's worker failed: {e}"
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_node_ids() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            socket_path("unix:/csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            socket_path("/run/x.sock").unwrap(),
            PathBuf::from("/run/x.sock")
        );
        let longest = format!("/{}", "s".repeat(SOCKET_PATH_MAX - 1));
        assert_eq!(socket_path(&longest).unwrap(), PathBuf::from(&longest));
        let e = socket_path(&format!("unix://{longest}x")).unwrap_err();
        assert!(e.to_string().contains("108 bytes"), "{e}");
        for bad in ["tcp://127.0.0.1:1", "unix://csi.sock", "", "unix:///"] {
            let e = socket_path(bad).unwrap_err();
            assert!(e.to_string().contains("unix:///"), "{bad}: {e}");
        }
        check_node_id("node-1.example").unwrap();
        for bad in ["", "Node_1", "a/b"] {
            let e = check_node_id(bad).unwrap_err();
            assert!(e.to_string().contains("--node-id"), "{e}");
        }
    }
}
