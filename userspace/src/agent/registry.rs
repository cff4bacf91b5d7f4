//! The agent's attachments: one daemon thread each, in its pod's network
//! namespace.
//!
//! # Theory of operation
//!
//! An attachment is a `tapgate run` on a pod's tap ([`crate::daemon::run`],
//! the one datapath code path) on a thread of its own, which first enters
//! the pod's network namespace (`crate::netns`), so the datapath's links,
//! sockets and interface lookups all belong to the pod. The registry holds,
//! per attachment, what the API needs: the request it was made from, its
//! phase, the channels to stop it and to ask it for its counters, and a
//! watch that carries the thread's outcome.
//!
//! Everything an attachment needs to come back after the agent restarts is
//! on disk: the request in `STATE_DIR/attachments/<containerId>/<ifname>.json`
//! (written before the datapath starts), the guest's MAC and DHCP lease in
//! `...<ifname>.guest.json` (the daemon's state file), and the datapath
//! itself pinned under `BPFFS_DIR/<containerId>/<ifname>/`. A new agent
//! reads the requests back and starts each attachment again, which adopts
//! its pinned datapath instead of creating one — established flows never
//! stop, since the kernel forwarded them all along.
//!
//! Stopping: `DELETE` (and GC) stop a daemon with [`Stop::Detach`] and
//! remove its files; the agent's own shutdown stops every daemon with
//! [`Stop::Keep`] and leaves the files for its successor. A daemon that
//! ends by itself because its tap or its namespace went away (the pod
//! ended) has removed its datapath; the registry then forgets it and
//! removes its files.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use log::{info, warn};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    api::{AttachRequest, Attachment, AttachmentId, Phase},
    settings,
};
use crate::{
    cli::LogLevel,
    daemon::{self, Ended, Hooks, Query, Ready, Stop},
    kernel::loader,
    metrics, netns,
};

/// Datagrams of one attachment's flows the kernel tracks in reassembly
/// at once (its LRU map is preallocated: 1024 entries cost ~90 KiB, the
/// default 8192 of `tapgate run` ~700 KiB).
pub const AGENT_FRAGS_MAX: u32 = 1024;
/// How long an attachment may take to start serving.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stats query may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stopping daemon may take.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of registry operations, mapped onto HTTP status codes by the
/// server.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request is malformed or its settings are invalid (400).
    #[error("{0}")]
    BadRequest(String),
    /// The attachment exists with other parameters (409).
    #[error("{0}")]
    Conflict(String),
    /// No such attachment (404).
    #[error("no attachment {0}")]
    NotFound(AttachmentId),
    /// The datapath failed to start or stop (500).
    #[error("{0}")]
    Failed(String),
}

/// How a daemon thread ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// `daemon::run` returned.
    Ended(Ended),
    /// `daemon::run` failed.
    Error(String),
}

/// One attachment.
struct Entry {
    request: AttachRequest,
    phase: Phase,
    uplink: Option<String>,
    adopted: bool,
    error: Option<String>,
    stop: Option<oneshot::Sender<Stop>>,
    queries: mpsc::Sender<Query>,
    done: watch::Receiver<Option<Outcome>>,
}

impl Entry {
    fn view(&self, stats: Option<Value>) -> Attachment {
        Attachment {
            id: self.request.id.clone(),
            netns: self.request.netns.clone(),
            pod_namespace: self.request.pod_namespace.clone(),
            pod_name: self.request.pod_name.clone(),
            network: self.request.network.clone(),
            settings: self.request.settings.clone(),
            phase: self.phase,
            uplink: self.uplink.clone(),
            adopted: self.adopted,
            error: self.error.clone(),
            stats,
        }
    }
}

/// Where the agent keeps things.
#[derive(Clone, Debug)]
pub struct Paths {
    /// Requests and guest state.
    pub state_dir: PathBuf,
    /// Pinned datapaths.
    pub bpffs_dir: PathBuf,
}

impl Paths {
    fn attachments(&self) -> PathBuf {
        self.state_dir.join("attachments")
    }

    fn request_file(&self, id: &AttachmentId) -> PathBuf {
        self.attachments()
            .join(&id.container_id)
            .join(format!("{}.json", id.ifname))
    }

    fn guest_file(&self, id: &AttachmentId) -> PathBuf {
        self.attachments()
            .join(&id.container_id)
            .join(format!("{}.guest.json", id.ifname))
    }

    fn pin_dir(&self, id: &AttachmentId) -> PathBuf {
        self.bpffs_dir.join(&id.container_id).join(&id.ifname)
    }

    /// Removes the records of `id` and, with `pins`, whatever is still
    /// pinned for it (its datapath must be stopped).
    fn forget(&self, id: &AttachmentId, pins: bool) {
        for f in [self.request_file(id), self.guest_file(id)] {
            if let Err(e) = fs::remove_file(&f)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!("removing {}: {e}", f.display());
            }
        }
        let _ = fs::remove_dir(self.attachments().join(&id.container_id));
        if !pins {
            return;
        }
        if loader::remove_pins(&self.pin_dir(id)) {
            info!("{id}: removed leftover pins");
        }
        let _ = fs::remove_dir(self.bpffs_dir.join(&id.container_id));
    }
}

/// The attachments of this agent.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Mutex<BTreeMap<AttachmentId, Entry>>>,
    paths: Paths,
    log_level: LogLevel,
    ring_bytes: u32,
    metrics: metrics::AgentMetrics,
}

impl Registry {
    /// An empty registry.
    pub fn new(
        paths: Paths,
        log_level: LogLevel,
        ring_bytes: u32,
        metrics: metrics::AgentMetrics,
    ) -> Self {
        Self {
            inner: Arc::default(),
            paths,
            log_level,
            ring_bytes,
            metrics,
        }
    }

    /// The agent's own metrics.
    pub fn metrics(&self) -> &metrics::AgentMetrics {
        &self.metrics
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<AttachmentId, Entry>> {
        // A panic while holding the lock cannot leave a half-made entry
        // (no code path panics there); go on with the data.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Creates (or, for the same request, returns) an attachment and waits
    /// until it serves the guest. `Ok((attachment, created))`.
    pub async fn create(
        &self,
        request: AttachRequest,
    ) -> Result<(Attachment, bool), RegistryError> {
        request.id.validate().map_err(RegistryError::BadRequest)?;
        if let Some(e) = self.lock().get(&request.id) {
            if e.request == request {
                return Ok((e.view(None), false));
            }
            return Err(RegistryError::Conflict(format!(
                "attachment {} exists with other parameters",
                request.id
            )));
        }
        let args = settings::run_args(&request.id.ifname, &request.settings, self.log_level)
            .map_err(RegistryError::BadRequest)?;
        if netns::id_of(&request.netns).is_none() {
            return Err(RegistryError::BadRequest(format!(
                "network namespace {} does not exist",
                request.netns.display()
            )));
        }
        // On disk first: an agent that dies during set-up finds it again.
        let file = self.paths.request_file(&request.id);
        write_json(&file, &request).map_err(RegistryError::Failed)?;
        let started = Instant::now();
        let id = request.id.clone();
        let (ready_rx, entry) = self.spawn(request, args);
        self.lock().insert(id.clone(), entry);
        let done = self
            .lock()
            .get(&id)
            .map(|e| e.done.clone())
            .ok_or_else(|| RegistryError::Failed("attachment vanished".into()))?;
        match wait_ready(ready_rx, done).await {
            Ok(ready) => {
                self.metrics
                    .setup_seconds
                    .observe(started.elapsed().as_secs_f64());
                let mut map = self.lock();
                let e = map
                    .get_mut(&id)
                    .ok_or_else(|| RegistryError::Failed("attachment vanished".into()))?;
                e.phase = Phase::Running;
                e.uplink = Some(ready.uplink);
                e.adopted = ready.adopted;
                info!(
                    "{id}: serving{} in {:.0} ms",
                    if ready.adopted {
                        format!(" (adopted, {} flows)", ready.flows_adopted)
                    } else {
                        String::new()
                    },
                    started.elapsed().as_secs_f64() * 1000.0
                );
                let view = e.view(None);
                drop(map);
                self.watch_end(id);
                Ok((view, true))
            }
            Err(msg) => {
                // The daemon removed whatever it had made. Pins it did not
                // make stay: they may be another version's running
                // datapath, which a refused start must not destroy.
                let entry = self.lock().remove(&id);
                if let Some(mut e) = entry {
                    if let Some(stop) = e.stop.take() {
                        let _ = stop.send(Stop::Detach);
                    }
                    let _ = wait_done(e.done, STOP_TIMEOUT).await;
                }
                self.paths.forget(&id, false);
                warn!("{id}: set-up failed: {msg}");
                Err(RegistryError::Failed(msg))
            }
        }
    }

    /// Starts the daemon thread of `request`.
    fn spawn(
        &self,
        request: AttachRequest,
        args: crate::cli::RunArgs,
    ) -> (oneshot::Receiver<Ready>, Entry) {
        let (stop_tx, stop_rx) = oneshot::channel();
        let (q_tx, q_rx) = mpsc::channel(8);
        let (ready_tx, ready_rx) = oneshot::channel();
        let (done_tx, done_rx) = watch::channel(None);
        let hooks = Hooks {
            pin_dir: Some(self.paths.pin_dir(&request.id)),
            keep_on_signal: false,
            state_file: Some(self.paths.guest_file(&request.id)),
            netns_watch: None,
            stop: Some(stop_rx),
            queries: Some(q_rx),
            ready: Some(ready_tx),
            ring_bytes: self.ring_bytes,
            frags_max: AGENT_FRAGS_MAX,
            control_socket: true,
        };
        let netns_path = request.netns.clone();
        let id = request.id.clone();
        let thread_name = format!(
            "{}/{}",
            &id.container_id[..id.container_id.len().min(12)],
            id.ifname
        );
        let spawned = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let outcome = attachment_thread(&netns_path, &args, hooks);
                if let Outcome::Error(e) = &outcome {
                    warn!("{id}: {e}");
                }
                let _ = done_tx.send(Some(outcome));
            });
        let (done, stop) = match spawned {
            Ok(_) => (done_rx, Some(stop_tx)),
            Err(e) => {
                let (tx, rx) =
                    watch::channel(Some(Outcome::Error(format!("starting a thread: {e}"))));
                drop(tx);
                (rx, None)
            }
        };
        let entry = Entry {
            request,
            phase: Phase::Starting,
            uplink: None,
            adopted: false,
            error: None,
            stop,
            queries: q_tx,
            done,
        };
        (ready_rx, entry)
    }

    /// Follows a running attachment: when its daemon ends by itself (tap
    /// or namespace gone, an error), the registry learns of it.
    fn watch_end(&self, id: AttachmentId) {
        let Some(mut done) = self.lock().get(&id).map(|e| e.done.clone()) else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let outcome = loop {
                if let Some(o) = done.borrow_and_update().clone() {
                    break o;
                }
                if done.changed().await.is_err() {
                    break Outcome::Error("the datapath thread vanished".into());
                }
            };
            me.ended(&id, outcome);
        });
    }

    /// A daemon ended on its own or was stopped.
    fn ended(&self, id: &AttachmentId, outcome: Outcome) {
        let mut map = self.lock();
        match outcome {
            // Stopped through the registry: whoever stopped it cleans up.
            Outcome::Ended(Ended::Stopped(_)) => {}
            Outcome::Ended(gone @ (Ended::TapGone | Ended::NetnsGone)) => {
                if map.remove(id).is_some() {
                    drop(map);
                    info!("{id}: {gone:?}, attachment removed");
                    self.paths.forget(id, true);
                }
            }
            Outcome::Error(msg) => {
                if let Some(e) = map.get_mut(id) {
                    e.phase = Phase::Failed;
                    e.error = Some(msg);
                }
            }
        }
    }

    /// One attachment, with its counters if it is running.
    pub async fn get(&self, id: &AttachmentId) -> Result<Attachment, RegistryError> {
        let (view, queries) = {
            let map = self.lock();
            let e = map
                .get(id)
                .ok_or_else(|| RegistryError::NotFound(id.clone()))?;
            (e.view(None), e.queries.clone())
        };
        let stats = if view.phase == Phase::Running {
            query_stats(&queries).await
        } else {
            None
        };
        Ok(Attachment { stats, ..view })
    }

    /// Every attachment (without counters).
    pub fn list(&self) -> Vec<Attachment> {
        self.lock().values().map(|e| e.view(None)).collect()
    }

    /// Stops `id`'s daemon with `how` and waits for it; with
    /// [`Stop::Detach`] its files go too.
    pub async fn remove(&self, id: &AttachmentId, how: Stop) -> Result<(), RegistryError> {
        let entry = self
            .lock()
            .remove(id)
            .ok_or_else(|| RegistryError::NotFound(id.clone()))?;
        let Entry { stop, done, .. } = entry;
        if let Some(stop) = stop {
            let _ = stop.send(how);
        }
        let outcome = wait_done(done, STOP_TIMEOUT).await;
        if how == Stop::Detach {
            self.paths.forget(id, true);
        }
        release_freed_memory();
        match outcome {
            Some(_) => {
                info!("{id}: stopped ({how:?})");
                Ok(())
            }
            None => Err(RegistryError::Failed(format!(
                "{id}: the datapath did not stop within {STOP_TIMEOUT:?}"
            ))),
        }
    }

    /// Removes every attachment not in `valid` (of `network`, if given);
    /// returns those removed.
    pub async fn gc(&self, valid: &[AttachmentId], network: Option<&str>) -> Vec<AttachmentId> {
        let doomed: Vec<AttachmentId> = self
            .lock()
            .iter()
            .filter(|(id, e)| {
                !valid.contains(id)
                    && network.is_none_or(|n| e.request.network.as_deref() == Some(n))
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut removed = Vec::new();
        for id in doomed {
            match self.remove(&id, Stop::Detach).await {
                Ok(()) => removed.push(id),
                Err(e) => warn!("gc: {e}"),
            }
        }
        removed
    }

    /// Stops every daemon leaving its datapath pinned (the agent is going
    /// away; its successor adopts them).
    pub async fn shutdown(&self) {
        let ids: Vec<AttachmentId> = self.lock().keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.remove(&id, Stop::Keep).await {
                warn!("{e}");
            }
        }
    }

    /// Counters of every running attachment, for a scrape.
    pub async fn scrape(&self) -> Vec<(metrics::Target, Value)> {
        let targets: Vec<(metrics::Target, mpsc::Sender<Query>)> = {
            let map = self.lock();
            let mut phases: BTreeMap<&'static str, i64> = BTreeMap::new();
            for p in ["starting", "running", "failed"] {
                phases.insert(p, 0);
            }
            for e in map.values() {
                *phases.entry(phase_name(e.phase)).or_default() += 1;
            }
            for (p, n) in phases {
                self.metrics
                    .attachments
                    .get_or_create(&metrics::PhaseLabels {
                        phase: p.to_owned(),
                    })
                    .set(n);
            }
            map.values()
                .filter(|e| e.phase == Phase::Running)
                .map(|e| {
                    (
                        metrics::Target {
                            namespace: e.request.pod_namespace.clone().unwrap_or_default(),
                            pod: e.request.pod_name.clone().unwrap_or_default(),
                            interface: e.request.id.ifname.clone(),
                        },
                        e.queries.clone(),
                    )
                })
                .collect()
        };
        let mut set = tokio::task::JoinSet::new();
        for (t, q) in targets {
            set.spawn(async move { query_stats(&q).await.map(|s| (t, s)) });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok(Some(x)) = r {
                out.push(x);
            }
        }
        out
    }

    /// Starts again every attachment a previous agent recorded: those whose
    /// namespace still exists adopt their pinned datapaths; the others are
    /// removed with their pins.
    pub async fn restore(&self) {
        for request in self.recorded() {
            let id = request.id.clone();
            if netns::id_of(&request.netns).is_none() {
                info!(
                    "{id}: network namespace {} is gone; removing what was left",
                    request.netns.display()
                );
                self.paths.forget(&id, true);
                continue;
            }
            match self.create(request).await {
                Ok(_) => {}
                Err(e) => warn!("{id}: not restored: {e}"),
            }
        }
    }

    /// The requests recorded in the state directory.
    fn recorded(&self) -> Vec<AttachRequest> {
        let mut out = Vec::new();
        let Ok(dirs) = fs::read_dir(self.paths.attachments()) else {
            return out;
        };
        for dir in dirs.flatten() {
            let Ok(files) = fs::read_dir(dir.path()) else {
                continue;
            };
            for f in files.flatten() {
                let path = f.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if !name.ends_with(".json") || name.ends_with(".guest.json") {
                    continue;
                }
                match fs::read(&path).map_err(|e| e.to_string()).and_then(|t| {
                    serde_json::from_slice::<AttachRequest>(&t).map_err(|e| e.to_string())
                }) {
                    Ok(r) => out.push(r),
                    Err(e) => warn!("ignoring {}: {e}", path.display()),
                }
            }
        }
        out
    }
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Starting => "starting",
        Phase::Running => "running",
        Phase::Failed => "failed",
        Phase::Stopped => "stopped",
    }
}

/// The body of an attachment's thread.
fn attachment_thread(netns_path: &Path, args: &crate::cli::RunArgs, mut hooks: Hooks) -> Outcome {
    let ino = match netns::enter(netns_path) {
        Ok(ino) => ino,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    hooks.netns_watch = Some((netns_path.to_owned(), ino));
    match daemon::run(args, hooks) {
        Ok(ended) => Outcome::Ended(ended),
        Err(e) => Outcome::Error(format!("{e:#}")),
    }
}

/// Waits for a daemon to report readiness, or to end first.
async fn wait_ready(
    ready: oneshot::Receiver<Ready>,
    done: watch::Receiver<Option<Outcome>>,
) -> Result<Ready, String> {
    let ended = async {
        match wait_done(done, SETUP_TIMEOUT).await {
            Some(Outcome::Error(e)) => e,
            Some(Outcome::Ended(e)) => format!("the datapath ended during set-up ({e:?})"),
            None => format!("the datapath did not start within {SETUP_TIMEOUT:?}"),
        }
    };
    tokio::pin!(ended);
    tokio::select! {
        r = ready => match r {
            Ok(r) => Ok(r),
            // The daemon dropped the sender: it failed; `ended` says why.
            Err(_) => Err((&mut ended).await),
        },
        msg = &mut ended => Err(msg),
    }
}

/// Waits (bounded) for a daemon thread's outcome.
async fn wait_done(mut done: watch::Receiver<Option<Outcome>>, limit: Duration) -> Option<Outcome> {
    let wait = async {
        loop {
            if let Some(o) = done.borrow_and_update().clone() {
                return Some(o);
            }
            if done.changed().await.is_err() {
                return done.borrow().clone();
            }
        }
    };
    tokio::time::timeout(limit, wait).await.ok().flatten()
}

/// Asks a daemon for its counters (bounded).
async fn query_stats(queries: &mpsc::Sender<Query>) -> Option<Value> {
    let (tx, rx) = oneshot::channel();
    queries.send(Query::Stats(tx)).await.ok()?;
    tokio::time::timeout(QUERY_TIMEOUT, rx).await.ok()?.ok()
}

/// Gives memory freed by an ended attachment's thread back to the system
/// (glibc keeps it in the thread's arena otherwise).
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Writes `value` as JSON to `path` atomically.
fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let text = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("writing {}: {e}", path.display()))
}
