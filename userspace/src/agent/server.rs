//! The agent's HTTP server (axum): the API on a UNIX socket, `/healthz`
//! and `/metrics` also on TCP; and the metrics endpoint of `tapgate run
//! --metrics`.
//!
//! # Theory of operation
//!
//! Routes are thin: they decode the body, call the [`Registry`], map its
//! errors onto status codes with an [`ApiError`] body, and count the
//! request by verb and result in the agent's metrics. `/metrics` asks every
//! running attachment for its counters (each answers on its own thread)
//! and renders them with the agent's own metrics. The TCP listener (for
//! the kubelet's probes and Prometheus) serves only `/healthz` and
//! `/metrics`: creating or deleting attachments stays on the UNIX socket,
//! whose mode (0600) limits it to root.

use std::{net::SocketAddr, os::unix::fs::PermissionsExt, path::Path};

use anyhow::{Context, Result, bail};
use axum::{
    Json, Router,
    extract::{Path as UrlPath, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use log::{info, warn};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::{
    api::{ApiError, AttachRequest, AttachmentId, AttachmentList, Deleted, GcRequest, GcResponse},
    registry::{Registry, RegistryError},
};
use crate::{
    daemon::{Query, Stop},
    metrics,
};

/// An API error answer.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

/// Maps a registry error to its status and the metrics' result label.
fn failure(reg: &Registry, verb: &str, e: RegistryError) -> Failure {
    let (status, result) = match &e {
        RegistryError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        RegistryError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        RegistryError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        RegistryError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "error"),
    };
    reg.metrics().request(verb, result);
    Failure(status, e.to_string())
}

fn id_of(container_id: String, ifname: String) -> AttachmentId {
    AttachmentId {
        container_id,
        ifname,
    }
}

async fn create(
    State(reg): State<Registry>,
    body: Result<Json<AttachRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Failure> {
    let Json(request) = body.map_err(|e| {
        reg.metrics().request("create", "bad_request");
        Failure(StatusCode::BAD_REQUEST, e.body_text())
    })?;
    let (view, created) = reg
        .create(request)
        .await
        .map_err(|e| failure(&reg, "create", e))?;
    reg.metrics().request("create", "ok");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

async fn list(State(reg): State<Registry>) -> Json<AttachmentList> {
    reg.metrics().request("list", "ok");
    Json(AttachmentList {
        attachments: reg.list(),
    })
}

async fn get_one(
    State(reg): State<Registry>,
    UrlPath((cid, ifname)): UrlPath<(String, String)>,
) -> Result<Response, Failure> {
    let view = reg
        .get(&id_of(cid, ifname))
        .await
        .map_err(|e| failure(&reg, "get", e))?;
    reg.metrics().request("get", "ok");
    Ok(Json(view).into_response())
}

async fn delete_one(
    State(reg): State<Registry>,
    UrlPath((cid, ifname)): UrlPath<(String, String)>,
) -> Result<Response, Failure> {
    let id = id_of(cid, ifname);
    reg.remove(&id, Stop::Detach)
        .await
        .map_err(|e| failure(&reg, "delete", e))?;
    reg.metrics().request("delete", "ok");
    Ok(Json(Deleted { deleted: id }).into_response())
}

async fn gc(
    State(reg): State<Registry>,
    body: Result<Json<GcRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Failure> {
    let Json(request) = body.map_err(|e| {
        reg.metrics().request("gc", "bad_request");
        Failure(StatusCode::BAD_REQUEST, e.body_text())
    })?;
    let removed = reg.gc(&request.valid, request.network.as_deref()).await;
    reg.metrics().request("gc", "ok");
    Ok(Json(GcResponse { removed }).into_response())
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn agent_metrics(State(reg): State<Registry>) -> Response {
    let datapaths = reg.scrape().await;
    let text = metrics::render(&datapaths, Some(reg.metrics()));
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

/// The full API (UNIX socket).
pub fn api_router(reg: Registry) -> Router {
    Router::new()
        .route("/v1/attachments", post(create).get(list))
        .route(
            "/v1/attachments/{container_id}/{ifname}",
            get(get_one).delete(delete_one),
        )
        .route("/v1/gc", post(gc))
        .route("/healthz", get(healthz))
        .route("/metrics", get(agent_metrics))
        .with_state(reg)
}

/// Health and metrics only (TCP).
pub fn public_router(reg: Registry) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(agent_metrics))
        .with_state(reg)
}

/// Binds the API socket: its directory is created (0755), a stale socket
/// replaced, a live one refused; the socket is 0600.
pub fn bind_api_socket(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another agent is listening on {} (stop it, or use --socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding the API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

/// Serves `router` on the UNIX listener until `shutdown` resolves.
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving the API socket")
}

/// Serves `router` on TCP `addr` until `shutdown` resolves.
pub async fn serve_tcp(
    addr: SocketAddr,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    info!("serving /healthz and /metrics on {addr}");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving metrics")
}

/// The metrics server of `tapgate run --metrics`: a thread of its own
/// with a small runtime, asking the daemon through `queries`. Dropping the
/// returned guard stops it.
pub fn serve_run_metrics(
    addr: SocketAddr,
    tap: String,
    queries: mpsc::Sender<Query>,
) -> Result<MetricsGuard> {
    let std_listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("--metrics {addr}"))?;
    std_listener
        .set_nonblocking(true)
        .context("--metrics: setting the socket non-blocking")?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!("metrics server: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        warn!("metrics server: {e}");
                        return;
                    }
                };
                let router = Router::new()
                    .route("/healthz", get(healthz))
                    .route("/metrics", get(run_metrics))
                    .with_state((tap, queries));
                let shutdown = async {
                    let _ = stop_rx.await;
                };
                if let Err(e) = axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown)
                    .await
                {
                    warn!("metrics server: {e}");
                }
            });
        })
        .context("starting the metrics thread")?;
    info!("serving /metrics on {addr}");
    Ok(MetricsGuard {
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// Stops the metrics server of [`serve_run_metrics`] when dropped.
pub struct MetricsGuard {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for MetricsGuard {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn run_metrics(State((tap, queries)): State<(String, mpsc::Sender<Query>)>) -> Response {
    let (tx, rx) = oneshot::channel();
    let stats: Option<Value> = match queries.send(Query::Stats(tx)).await {
        Ok(()) => tokio::time::timeout(super::registry::QUERY_TIMEOUT, rx)
            .await
            .ok()
            .and_then(Result::ok),
        Err(_) => None,
    };
    let Some(stats) = stats else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon did not answer\n",
        )
            .into_response();
    };
    let target = metrics::Target {
        namespace: String::new(),
        pod: String::new(),
        interface: tap,
    };
    let text = metrics::render(&[(target, stats)], None);
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}
