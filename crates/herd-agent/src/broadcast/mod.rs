//! This host's part in broadcasts: taking a VM's snapshot when it is the source, and
//! holding and passing on the snapshot's chunks when it is in the tree.
//!
//! Chunks flow parent to child over the agents' authenticated connections, the parent
//! dialling. Every host takes the chunks in order and checks each against the hash in
//! the manifest the server gave it before it writes it and before any child sees it,
//! so each host holds a checked prefix and forwards chunk `i` the moment it has it: the
//! tree is a pipeline, and the snapshot reaches the last host about one chunk per level
//! after the first. A chunk that fails its hash ends the connection; the parent dials
//! again and the child asks from the first chunk it lacks. A child that cannot be
//! reached for [`GIVE_UP`] is given up on, and its children are fed by its parent
//! (`tree::children`), so a dead interior host costs its subtree a new parent; a child
//! accepts any of its ancestors as its sender, the latest connection winning.

pub mod held;
pub mod tree;

use crate::driver::Driver;
use crate::transfer::{self, PeerTls, Stream};
use held::Held;
use herd_proto::broadcast::{
    BroadcastId, BroadcastOrder, BroadcastReply, BroadcastUpdate, Manifest, TransferOpen, TreeHost,
};
use herd_proto::wire::{AgentMsg, HostId, VmId};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// A child that cannot be reached, or refuses, for this long is given up on.
const GIVE_UP: Duration = Duration::from_secs(8);
/// Between two tries at a child.
const RETRY: Duration = Duration::from_millis(300);
/// A chunk that takes longer than this to arrive ends the connection.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);
/// How often progress goes to the server while it moves.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// This host's broadcasts.
#[derive(Clone)]
pub struct Broadcasts {
    inner: Arc<Inner>,
}

struct Inner {
    me: HostId,
    root: PathBuf,
    drivers: Vec<Arc<dyn Driver>>,
    tls: Option<PeerTls>,
    answers: mpsc::UnboundedSender<AgentMsg>,
    /// Snapshots taken here, by broadcast (answered again from memory).
    captured: Mutex<HashMap<BroadcastId, (Manifest, u64)>>,
    /// Captures under way.
    capturing: Mutex<HashSet<BroadcastId>>,
    active: Mutex<HashMap<BroadcastId, Arc<Active>>>,
}

/// One broadcast this host is in.
struct Active {
    held: Arc<Held>,
    tree: Vec<TreeHost>,
    /// How many chunks from the first this host holds, checked.
    chunks: watch::Sender<u32>,
    refetched: AtomicU32,
    /// The stream this host takes chunks from now (the latest sender wins).
    upstream: Mutex<Option<JoinHandle<()>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Active {
    /// Ends every task of the broadcast here (they hold the broadcast themselves, so
    /// dropping it would not).
    fn stop(&self) {
        if let Some(up) = self.upstream.lock().take() {
            up.abort();
        }
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
    }
}

fn error_text(e: &dyn std::error::Error) -> String {
    crate::agent::error_chain(e)
}

impl Broadcasts {
    /// `root` holds one directory per broadcast; `tls` is `None` for an agent joined
    /// over plain HTTP, which can take part in none.
    pub fn new(
        me: HostId,
        root: PathBuf,
        drivers: Vec<Arc<dyn Driver>>,
        tls: Option<PeerTls>,
        answers: mpsc::UnboundedSender<AgentMsg>,
    ) -> Broadcasts {
        Broadcasts {
            inner: Arc::new(Inner {
                me,
                root,
                drivers,
                tls,
                answers,
                captured: Default::default(),
                capturing: Default::default(),
                active: Default::default(),
            }),
        }
    }

    /// Where broadcast `id`'s snapshot is kept on this host.
    pub fn dir_of(&self, id: BroadcastId) -> PathBuf {
        self.inner.root.join(id.simple().to_string())
    }

    fn answer(&self, broadcast: BroadcastId, update: BroadcastUpdate) {
        let _ = self
            .inner
            .answers
            .send(AgentMsg::Broadcast { broadcast, update });
    }

    /// Carries out (or answers again) one of the server's orders.
    pub fn order(&self, order: BroadcastOrder) {
        match order {
            BroadcastOrder::Capture { broadcast, vm } => self.capture(broadcast, vm),
            BroadcastOrder::Spread { manifest, tree } => self.spread(*manifest, tree),
            BroadcastOrder::Forget { broadcast } => {
                if let Some(active) = self.inner.active.lock().remove(&broadcast) {
                    active.stop();
                }
                self.inner.captured.lock().remove(&broadcast);
                let dir = self.dir_of(broadcast);
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        warn!(%broadcast, "removing {}: {e}", dir.display());
                    }
                }
                self.answer(broadcast, BroadcastUpdate::Forgotten);
            }
        }
    }

    fn capture(&self, broadcast: BroadcastId, vm: VmId) {
        if let Some((manifest, paused_ms)) = self.inner.captured.lock().get(&broadcast).cloned() {
            return self.answer(
                broadcast,
                BroadcastUpdate::Captured {
                    manifest: Box::new(manifest),
                    paused_ms,
                },
            );
        }
        if !self.inner.capturing.lock().insert(broadcast) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let taken = me.take(broadcast, vm).await;
            me.inner.capturing.lock().remove(&broadcast);
            match taken {
                Ok((manifest, paused_ms)) => {
                    info!(%broadcast, %vm, bytes = manifest.total_bytes(), paused_ms, "snapshot taken");
                    me.inner
                        .captured
                        .lock()
                        .insert(broadcast, (manifest.clone(), paused_ms));
                    me.answer(
                        broadcast,
                        BroadcastUpdate::Captured {
                            manifest: Box::new(manifest),
                            paused_ms,
                        },
                    );
                }
                Err(reason) => {
                    warn!(%broadcast, %vm, "snapshot failed: {reason}");
                    me.answer(broadcast, BroadcastUpdate::Failed { reason });
                }
            }
        });
    }

    async fn take(&self, broadcast: BroadcastId, vm: VmId) -> Result<(Manifest, u64), String> {
        let mut holder = None;
        for driver in &self.inner.drivers {
            if let Ok(Some(_)) = driver.state_of(vm).await {
                holder = Some(driver.clone());
                break;
            }
        }
        let driver = holder.ok_or("the VM is not on this host")?;
        let dir = self.dir_of(broadcast);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("making {}: {e}", dir.display()))?;
        let snapshot = driver
            .snapshot(vm, &dir)
            .await
            .map_err(|e| error_text(&e))?;
        let names = snapshot.files.clone();
        let cut_dir = dir.clone();
        let (files, chunk_bytes, hashes) =
            tokio::task::spawn_blocking(move || held::cut(&cut_dir, &names))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("hashing the snapshot: {e}"))?;
        let manifest = Manifest {
            broadcast,
            vm,
            hypervisor: driver.kind().to_owned(),
            files,
            chunk_bytes,
            hashes,
            handoff: snapshot.handoff,
        };
        Ok((manifest, snapshot.paused_ms))
    }

    fn spread(&self, manifest: Manifest, tree: Vec<TreeHost>) {
        let broadcast = manifest.broadcast;
        if let Some(active) = self.inner.active.lock().get(&broadcast).cloned() {
            return self.progress(broadcast, &active);
        }
        if let Err(e) = manifest.check() {
            return self.answer(
                broadcast,
                BroadcastUpdate::Failed {
                    reason: format!("the manifest: {e}"),
                },
            );
        }
        if self.inner.tls.is_none() {
            return self.answer(
                broadcast,
                BroadcastUpdate::Failed {
                    reason: "this host joined over plain HTTP and takes no transfers".into(),
                },
            );
        }
        let dir = self.dir_of(broadcast);
        let held = match Held::open(&dir, &manifest) {
            Ok(held) => held,
            Err(e) => {
                return self.answer(
                    broadcast,
                    BroadcastUpdate::Failed {
                        reason: format!("holding the snapshot in {}: {e}", dir.display()),
                    },
                )
            }
        };
        // The source took it; anyone else checks what an earlier run left.
        let taken_here = self
            .inner
            .captured
            .lock()
            .get(&broadcast)
            .is_some_and(|(m, _)| *m == manifest);
        let have = if taken_here {
            manifest.chunks()
        } else {
            held.verified_prefix().unwrap_or(0)
        };
        let (chunks, _) = watch::channel(have);
        let active = Arc::new(Active {
            held: Arc::new(held),
            tree,
            chunks,
            refetched: AtomicU32::new(0),
            upstream: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
        });
        self.inner.active.lock().insert(broadcast, active.clone());
        let sending = tokio::spawn(self.clone().send_down(broadcast, active.clone()));
        let reporting = tokio::spawn(self.clone().report(broadcast, active.clone()));
        active.tasks.lock().extend([sending, reporting]);
    }

    fn progress(&self, broadcast: BroadcastId, active: &Active) {
        let chunks = *active.chunks.borrow();
        let refetched = active.refetched.load(Ordering::Relaxed);
        let update = if chunks == active.held.manifest.chunks() {
            BroadcastUpdate::Done { chunks, refetched }
        } else {
            BroadcastUpdate::Progress { chunks, refetched }
        };
        self.answer(broadcast, update);
    }

    /// Progress to the server while chunks come, then done.
    async fn report(self, broadcast: BroadcastId, active: Arc<Active>) {
        let mut rx = active.chunks.subscribe();
        let total = active.held.manifest.chunks();
        let mut said = None;
        loop {
            let now = *rx.borrow_and_update();
            if said != Some(now) {
                if now == total {
                    let held = active.held.clone();
                    let _ = tokio::task::spawn_blocking(move || held.sync()).await;
                }
                self.progress(broadcast, &active);
                said = Some(now);
            }
            if now == total {
                return;
            }
            // Progress at most every PROGRESS_EVERY, the end at once.
            if let Ok(Err(_)) =
                tokio::time::timeout(PROGRESS_EVERY, rx.wait_for(|c| *c == total)).await
            {
                return;
            }
        }
    }

    /// Feeds this host's children, and the children of any it gives up on.
    async fn send_down(self, broadcast: BroadcastId, active: Arc<Active>) {
        let mut dead = HashSet::new();
        let mut sending: tokio::task::JoinSet<(HostId, bool)> = tokio::task::JoinSet::new();
        let mut started = HashSet::new();
        loop {
            for child in tree::children(&active.tree, self.inner.me, &dead) {
                if started.insert(child) {
                    let me = self.clone();
                    let active = active.clone();
                    sending.spawn(async move {
                        let ok = me.feed(broadcast, &active, child).await;
                        (child, ok)
                    });
                }
            }
            match sending.join_next().await {
                None => return,
                Some(Ok((_, true))) => {}
                Some(Ok((child, false))) => {
                    warn!(%broadcast, %child, "giving up on a child; its children are fed from here");
                    dead.insert(child);
                }
                Some(Err(_)) => return,
            }
        }
    }

    /// Sends `child` every chunk it lacks, as this host gets them; `false` once it has
    /// been unreachable, or refused, for [`GIVE_UP`].
    async fn feed(&self, broadcast: BroadcastId, active: &Active, child: HostId) -> bool {
        let Some(addr) = active
            .tree
            .iter()
            .find(|h| h.host == child)
            .map(|h| h.addr.clone())
        else {
            return false;
        };
        let Some(tls) = self.inner.tls.clone() else {
            return false;
        };
        let mut last_progress = Instant::now();
        loop {
            match self.feed_once(broadcast, active, &tls, &addr, child).await {
                Ok(FeedEnd::Complete) => return true,
                Ok(FeedEnd::Progressed) => last_progress = Instant::now(),
                Err(e) => {
                    if last_progress.elapsed() > GIVE_UP {
                        warn!(%broadcast, %child, "feeding the child failed: {e}");
                        return false;
                    }
                }
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn feed_once(
        &self,
        broadcast: BroadcastId,
        active: &Active,
        tls: &PeerTls,
        addr: &str,
        child: HostId,
    ) -> Result<FeedEnd, String> {
        let mut stream = transfer::dial(tls, addr, child)
            .await
            .map_err(|e| error_text(&e))?;
        transfer::write_frame(&mut stream, &TransferOpen::Broadcast { broadcast })
            .await
            .map_err(|e| error_text(&e))?;
        let from = match transfer::read_frame::<BroadcastReply>(&mut stream)
            .await
            .map_err(|e| error_text(&e))?
        {
            BroadcastReply::From { chunk } => chunk,
            BroadcastReply::Refused { reason } => return Err(format!("refused: {reason}")),
        };
        let total = active.held.manifest.chunks();
        let mut have = active.chunks.subscribe();
        let mut sent_any = false;
        for i in from..total {
            while *have.borrow_and_update() <= i {
                if have.changed().await.is_err() {
                    return Err("the broadcast ended here".into());
                }
            }
            let held = active.held.clone();
            let mut chunk = tokio::task::spawn_blocking(move || held.read_chunk(i))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("reading chunk {i}: {e}"))?;
            corrupt_once(i, &mut chunk);
            if let Err(e) = stream.write_all(&chunk).await {
                return if sent_any {
                    Ok(FeedEnd::Progressed)
                } else {
                    Err(format!("sending chunk {i}: {e}"))
                };
            }
            sent_any = true;
        }
        stream
            .flush()
            .await
            .map_err(|e| format!("sending the last chunk: {e}"))?;
        // The child closes once it has checked the last chunk; a bad one makes it close
        // early, and the next try asks from there.
        let mut rest = [0u8; 1];
        let _ = tokio::time::timeout(CHUNK_TIMEOUT, stream.read(&mut rest)).await;
        Ok(if from == total {
            FeedEnd::Complete
        } else {
            // Complete only if the child says so on the next connection.
            FeedEnd::Progressed
        })
    }

    /// A peer's connection, after its first frame named broadcast `broadcast`.
    pub async fn receive(&self, peer: HostId, mut stream: Stream, broadcast: BroadcastId) {
        let active = self.inner.active.lock().get(&broadcast).cloned();
        let Some(active) = active else {
            let reason = "no such broadcast is spreading here".to_owned();
            let _ = transfer::write_frame(&mut stream, &BroadcastReply::Refused { reason }).await;
            return;
        };
        if !tree::is_ancestor(&active.tree, peer, self.inner.me) {
            warn!(%broadcast, %peer, "chunks offered by a host not above this one; refused");
            let reason = "not a host above this one in the broadcast's tree".to_owned();
            let _ = transfer::write_frame(&mut stream, &BroadcastReply::Refused { reason }).await;
            return;
        }
        let from = *active.chunks.borrow();
        if transfer::write_frame(&mut stream, &BroadcastReply::From { chunk: from })
            .await
            .is_err()
        {
            return;
        }
        let reading = tokio::spawn(take_chunks(active.clone(), stream, from, broadcast));
        let old = active.upstream.lock().replace(reading);
        if let Some(old) = old {
            old.abort();
        }
    }
}

/// Fault injection, for tests and the fault battery: with `HERD_FAULT_FLIP_CHUNK=N` in
/// its environment this agent sends chunk N with a flipped byte, once, as a bad disk
/// or a bad peer would; the child must find it out by its hash and get it again.
fn corrupt_once(i: u32, chunk: &mut [u8]) {
    static WHICH: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let which = WHICH.get_or_init(|| std::env::var("HERD_FAULT_FLIP_CHUNK").ok()?.parse().ok());
    if *which == Some(i) && !chunk.is_empty() && !DONE.swap(true, Ordering::SeqCst) {
        warn!(
            chunk = i,
            "HERD_FAULT_FLIP_CHUNK: sending this chunk with a flipped byte"
        );
        chunk[0] ^= 0xff;
    }
}

enum FeedEnd {
    /// The child has every chunk.
    Complete,
    /// Chunks went; the connection ended before the child said it has them all.
    Progressed,
}

/// Reads chunks from `from` on, checking each, until the last or the first bad one.
async fn take_chunks(active: Arc<Active>, mut stream: Stream, from: u32, broadcast: BroadcastId) {
    let manifest = &active.held.manifest;
    for i in from..manifest.chunks() {
        let (_, len) = manifest.chunk_span(i);
        let mut buf = vec![0u8; len as usize];
        match tokio::time::timeout(CHUNK_TIMEOUT, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        if held::hash(&buf) != manifest.hashes[i as usize] {
            active.refetched.fetch_add(1, Ordering::Relaxed);
            warn!(%broadcast, chunk = i, "a chunk failed its hash; asking for it again");
            return;
        }
        let held = active.held.clone();
        let written = tokio::task::spawn_blocking(move || held.write_chunk(i, &buf)).await;
        if !matches!(written, Ok(Ok(()))) {
            warn!(%broadcast, chunk = i, "writing a chunk failed");
            return;
        }
        active.chunks.send_replace(i + 1);
    }
    let _ = stream.shutdown().await;
}
