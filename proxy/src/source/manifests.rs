//! A directory of manifests as a source.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory (dotfiles and editor
//! temp files are ignored) is read; the objects shunt consumes are sent as `Apply`, everything
//! else as `Invalid` naming the file and document. Then the directory is followed:
//!
//! * inotify (the `notify` crate) on the directory, and on its parent so that the directory
//!   itself being replaced (renamed over, deleted and recreated) is noticed; a burst of events
//!   is debounced ([`DEBOUNCE`]) into one rescan;
//! * a slow periodic rescan ([`RESCAN_EVERY`]) as a safety net for missed events (inotify
//!   queue overflow, a watch that could not be set up, filesystems without inotify);
//! * every rescan compares each file's bytes with what was last read, re-parses only the files
//!   that changed, and diffs the resulting objects against what was sent before, so only real
//!   changes produce events. Atomic rename-over writes, editors' write-then-rename, deleted
//!   files and Kubernetes ConfigMap volume symlink swaps all reduce to "the bytes changed".
//!
//! Per-file object sets are kept: if two files define the same object the one read last wins
//! (a warning is logged), and removing it from that file re-applies the other file's version.
//! A document that cannot be parsed contributes nothing, so an object whose document became
//! garbage is deleted (the same as `kubectl apply --prune` would not see it either).
mod parse;

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::object::{canonical, object_ref};
use super::{Origin, SourceEvent};
use crate::model::{Object, ObjectRef};

/// Quiet time that ends a burst of filesystem events (an editor's save is several events).
const DEBOUNCE: Duration = Duration::from_millis(100);
/// A burst never delays a rescan by more than this, even if events keep coming.
const DEBOUNCE_MAX: Duration = Duration::from_secs(1);
/// Safety-net rescan period.
const RESCAN_EVERY: Duration = Duration::from_secs(10);

/// Read every manifest in `dir`, send its objects, then `Synced`, then follow changes until
/// the receiver is dropped.
pub async fn run(dir: PathBuf, tx: mpsc::Sender<SourceEvent>) -> anyhow::Result<()> {
    let dir = std::path::absolute(&dir)
        .with_context(|| format!("manifest directory {}", dir.display()))?;
    // Startup is strict: a missing directory is a configuration error, not an empty cluster.
    std::fs::read_dir(&dir)
        .with_context(|| format!("reading manifest directory {}", dir.display()))?;

    let (sig_tx, mut sig_rx) = mpsc::channel::<()>(1);
    let mut watch = DirWatch::new(dir.clone(), sig_tx);
    watch.ensure();

    let mut state = DirState::new(dir.clone());
    for event in state.rescan().await {
        if tx.send(event).await.is_err() {
            return Ok(());
        }
    }
    if tx.send(SourceEvent::Synced).await.is_err() {
        return Ok(());
    }

    let mut ticker = tokio::time::interval(RESCAN_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate; the initial read just happened
    loop {
        tokio::select! {
            _ = tx.closed() => return Ok(()),
            _ = ticker.tick() => {}
            Some(()) = sig_rx.recv() => {
                // Debounce: wait until DEBOUNCE passes without a new event (bounded).
                let deadline = tokio::time::Instant::now() + DEBOUNCE_MAX;
                loop {
                    let quiet = tokio::time::sleep(DEBOUNCE);
                    tokio::select! {
                        _ = tx.closed() => return Ok(()),
                        _ = quiet => break,
                        _ = tokio::time::sleep_until(deadline) => break,
                        Some(()) = sig_rx.recv() => {}
                    }
                }
            }
        }
        // The directory may have been replaced: watch the new one.
        watch.ensure();
        for event in state.rescan().await {
            if tx.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// The objects the bytes of one manifest file define (each with its identity), and one reason
/// per document (or List item) that was skipped: the parser the directory source runs on
/// every changed file. `path` only decides JSON (`.json`) or YAML. Public for the fuzz target
/// (`proxy/fuzz`).
pub fn parse_bytes(path: &Path, bytes: &[u8]) -> (Vec<(ObjectRef, Object)>, Vec<String>) {
    let parsed = parse::parse_file(path, bytes);
    let objects = parsed
        .objects
        .into_iter()
        .map(|o| (object_ref(&o), o))
        .collect();
    (objects, parsed.problems)
}

/// The inotify watches on the directory and its parent; re-created when the directory's
/// inode changes (replaced) or it reappears.
struct DirWatch {
    dir: PathBuf,
    sig: mpsc::Sender<()>,
    watcher: Option<notify::RecommendedWatcher>,
    /// (dev, ino) of the directory the watch is on.
    watched: Option<(u64, u64)>,
    parent_watched: bool,
}

impl DirWatch {
    fn new(dir: PathBuf, sig: mpsc::Sender<()>) -> Self {
        DirWatch {
            dir,
            sig,
            watcher: None,
            watched: None,
            parent_watched: false,
        }
    }

    /// Make sure the watch is on the directory currently at `dir`. Failures are logged and
    /// retried at the next rescan; the periodic rescan covers the gap.
    fn ensure(&mut self) {
        let current = std::fs::metadata(&self.dir)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if self.watcher.is_some() && current == self.watched && self.parent_watched {
            return;
        }
        if self.watcher.is_none() {
            let sig = self.sig.clone();
            let dir = self.dir.clone();
            let w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                let relevant = match &res {
                    // Events in the parent only matter when they touch the directory itself;
                    // an error (e.g. inotify queue overflow) always triggers a rescan.
                    Ok(ev) => ev.paths.is_empty() || ev.paths.iter().any(|p| p.starts_with(&dir)),
                    Err(_) => true,
                };
                if relevant {
                    // A full channel already holds a pending rescan: nothing is lost.
                    let _ = sig.try_send(());
                }
            });
            match w {
                Ok(w) => self.watcher = Some(w),
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), "cannot create inotify watcher: {e}");
                    return;
                }
            }
        }
        let Some(w) = self.watcher.as_mut() else {
            return;
        };
        if current != self.watched {
            // The old watch died with the old inode (IN_IGNORED); removing it may fail.
            if self.watched.is_some() {
                let _ = w.unwatch(&self.dir);
            }
            self.watched = None;
            if current.is_some() {
                match w.watch(&self.dir, RecursiveMode::NonRecursive) {
                    Ok(()) => self.watched = current,
                    Err(e) => {
                        tracing::warn!(dir = %self.dir.display(), "cannot watch manifest directory: {e}")
                    }
                }
            }
        }
        if !self.parent_watched
            && let Some(parent) = self.dir.parent()
        {
            match w.watch(parent, RecursiveMode::NonRecursive) {
                Ok(()) => self.parent_watched = true,
                Err(e) => tracing::debug!(
                    parent = %parent.display(),
                    "cannot watch the manifest directory's parent: {e}"
                ),
            }
        }
    }
}

/// The manifest files of a directory: path and bytes, or why the file could not be read.
type Listing = Vec<(PathBuf, Result<Vec<u8>, String>)>;

/// What one file last contributed.
struct FileState {
    /// The bytes read, or why reading failed.
    content: Result<Vec<u8>, String>,
    /// Increases with every (re)read that changed the content: the highest wins duplicates.
    seq: u64,
    objects: BTreeMap<ObjectRef, Object>,
}

/// What the receiver currently holds for one object.
struct Emitted {
    file: PathBuf,
    canonical: String,
}

struct DirState {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    seq: u64,
    emitted: BTreeMap<ObjectRef, Emitted>,
    dir_missing_reported: bool,
}

impl DirState {
    fn new(dir: PathBuf) -> Self {
        DirState {
            dir,
            files: BTreeMap::new(),
            seq: 0,
            emitted: BTreeMap::new(),
            dir_missing_reported: false,
        }
    }

    /// Read the directory and return the events that bring the receiver up to date.
    async fn rescan(&mut self) -> Vec<SourceEvent> {
        let dir = self.dir.clone();
        let listing = tokio::task::spawn_blocking(move || read_manifests(&dir)).await;
        let listing = match listing {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("manifest directory scan task failed: {e}");
                return Vec::new();
            }
        };
        self.apply_listing(listing)
    }

    /// Fold a directory listing into the state (pure apart from logging).
    fn apply_listing(&mut self, listing: std::io::Result<Listing>) -> Vec<SourceEvent> {
        let mut events = Vec::new();
        let listing = match listing {
            Ok(l) => {
                self.dir_missing_reported = false;
                l
            }
            Err(e) => {
                // The directory vanished (or became unreadable) after startup: every file in
                // it is gone. It is watched again when it comes back.
                if !self.dir_missing_reported {
                    tracing::warn!(dir = %self.dir.display(), "manifest directory unreadable, treating as empty: {e}");
                    events.push(SourceEvent::Invalid {
                        origin: Origin::File(self.dir.clone()),
                        reason: format!("directory unreadable, treating it as empty: {e}"),
                    });
                    self.dir_missing_reported = true;
                }
                Vec::new()
            }
        };

        let mut changed = false;
        let present: std::collections::BTreeSet<&PathBuf> =
            listing.iter().map(|(p, _)| p).collect();
        let before = self.files.len();
        self.files.retain(|p, _| present.contains(p));
        changed |= self.files.len() != before;

        for (path, content) in listing {
            if self.files.get(&path).is_some_and(|f| f.content == content) {
                continue;
            }
            changed = true;
            self.seq += 1;
            let mut objects = BTreeMap::new();
            match &content {
                Ok(bytes) => {
                    let parsed = parse::parse_file(&path, bytes);
                    for problem in parsed.problems {
                        events.push(SourceEvent::Invalid {
                            origin: Origin::File(path.clone()),
                            reason: problem,
                        });
                    }
                    for object in parsed.objects {
                        let r = object_ref(&object);
                        if objects.insert(r.clone(), object).is_some() {
                            tracing::warn!(file = %path.display(), "{r} is defined twice in this file; the later definition wins");
                        }
                    }
                }
                Err(e) => events.push(SourceEvent::Invalid {
                    origin: Origin::File(path.clone()),
                    reason: format!("cannot read: {e}"),
                }),
            }
            self.files.insert(
                path,
                FileState {
                    content,
                    seq: self.seq,
                    objects,
                },
            );
        }
        if !changed {
            return events;
        }

        // The effective set: for every object, the file read last that defines it.
        let mut effective: BTreeMap<&ObjectRef, (&PathBuf, u64, &Object)> = BTreeMap::new();
        for (path, file) in &self.files {
            for (r, object) in &file.objects {
                match effective.get(r) {
                    Some((other, seq, _)) => {
                        let (winner, loser) = if file.seq > *seq {
                            (path, *other)
                        } else {
                            (*other, path)
                        };
                        tracing::warn!(
                            "{r} is defined in both {} and {}; using {} (read last)",
                            loser.display(),
                            winner.display(),
                            winner.display()
                        );
                        if file.seq > *seq {
                            effective.insert(r, (path, file.seq, object));
                        }
                    }
                    None => {
                        effective.insert(r, (path, file.seq, object));
                    }
                }
            }
        }

        let mut applies = Vec::new();
        let mut next_emitted = BTreeMap::new();
        for (r, (path, _, object)) in &effective {
            let c = canonical(object);
            let unchanged = self.emitted.get(*r).is_some_and(|e| e.canonical == c);
            if !unchanged {
                applies.push(SourceEvent::Apply {
                    origin: Origin::File((*path).clone()),
                    object: (*object).clone(),
                });
            }
            next_emitted.insert(
                (*r).clone(),
                Emitted {
                    file: (*path).clone(),
                    canonical: c,
                },
            );
        }
        let mut deletes = Vec::new();
        for (r, e) in &self.emitted {
            if !next_emitted.contains_key(r) {
                deletes.push(SourceEvent::Delete {
                    origin: Origin::File(e.file.clone()),
                    object: r.clone(),
                });
            }
        }
        self.emitted = next_emitted;
        events.extend(applies);
        events.extend(deletes);
        events
    }
}

/// The manifest files directly in `dir` (symlinks followed, so ConfigMap volumes work) and
/// their bytes, sorted by path so the initial "read last" order is deterministic.
fn read_manifests(dir: &Path) -> std::io::Result<Listing> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "reading directory entry: {e}");
                continue;
            }
        };
        let path = entry.path();
        if !parse::is_manifest_name(&path) {
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => {}
            // A subdirectory named *.yaml, a dangling symlink, or a file already gone again.
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => {
                out.push((path, Err(e.to_string())));
                continue;
            }
        }
        match std::fs::read(&path) {
            Ok(bytes) => out.push((path, Ok(bytes))),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => out.push((path, Err(e.to_string()))),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Kind;

    const WAIT: Duration = Duration::from_secs(5);

    fn svc(name: &str, port: i32) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: prod\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: {port}\n    protocol: TCP\n"
        )
    }

    fn eps(name: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: prod\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nendpoints:\n- addresses: [10.0.0.1]\nports:\n- port: 8080\n"
        )
    }

    const NODE_JSON: &str = r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"node-a"},"spec":{"podCIDRs":["10.244.0.0/24"]}}"#;

    async fn next(rx: &mut mpsc::Receiver<SourceEvent>) -> SourceEvent {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("timed out waiting for a source event")
            .expect("source closed the channel")
    }

    fn r(kind: Kind, ns: &str, name: &str) -> ObjectRef {
        ObjectRef {
            kind,
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn port_of(ev: &SourceEvent) -> i32 {
        match ev {
            SourceEvent::Apply {
                object: Object::Service(s),
                ..
            } => s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
            other => panic!("expected a Service Apply, got {other:?}"),
        }
    }

    fn file_of(ev: &SourceEvent) -> PathBuf {
        match ev {
            SourceEvent::Apply {
                origin: Origin::File(p),
                ..
            }
            | SourceEvent::Delete {
                origin: Origin::File(p),
                ..
            }
            | SourceEvent::Invalid {
                origin: Origin::File(p),
                ..
            } => p.clone(),
            other => panic!("no file origin: {other:?}"),
        }
    }

    /// Write via a temp file and rename over the target, as editors and `kubectl`-style
    /// tooling do.
    fn write_atomic(path: &Path, content: &str) {
        let tmp = path.with_file_name(format!(
            ".{}.tmp",
            path.file_name().unwrap().to_str().unwrap()
        ));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[tokio::test]
    async fn follows_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("manifests");
        std::fs::create_dir(&dir).unwrap();
        let a = dir.join("a.yaml");
        let b = dir.join("b.json");
        std::fs::write(&a, format!("{}---\n{}", svc("web", 80), eps("web-1"))).unwrap();
        std::fs::write(&b, NODE_JSON).unwrap();
        std::fs::write(dir.join("c.yaml"), "key: [unclosed\n").unwrap();
        std::fs::write(dir.join(".hidden.yaml"), svc("hidden", 1)).unwrap();
        std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();

        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(run(dir.clone(), tx));

        // Initial read: everything, then Synced.
        let mut applied = Vec::new();
        let mut invalid = Vec::new();
        loop {
            match next(&mut rx).await {
                SourceEvent::Synced => break,
                SourceEvent::Apply { origin, object } => {
                    applied.push((object_ref(&object), origin))
                }
                SourceEvent::Invalid { origin, reason } => invalid.push((origin, reason)),
                other => panic!("unexpected {other:?}"),
            }
        }
        applied.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            applied,
            vec![
                (r(Kind::Service, "prod", "web"), Origin::File(a.clone())),
                (
                    r(Kind::EndpointSlice, "prod", "web-1"),
                    Origin::File(a.clone())
                ),
                (r(Kind::Node, "", "node-a"), Origin::File(b.clone())),
            ]
        );
        assert_eq!(invalid.len(), 1, "{invalid:?}");
        assert_eq!(invalid[0].0, Origin::File(dir.join("c.yaml")));
        assert!(invalid[0].1.contains("document 1"), "{invalid:?}");

        // Edit in place: only the changed object is re-sent.
        std::fs::write(&a, format!("{}---\n{}", svc("web", 81), eps("web-1"))).unwrap();
        assert_eq!(port_of(&next(&mut rx).await), 81);

        // Remove an object from the file: Delete.
        std::fs::write(&a, svc("web", 81)).unwrap();
        match next(&mut rx).await {
            SourceEvent::Delete { object, origin } => {
                assert_eq!(object, r(Kind::EndpointSlice, "prod", "web-1"));
                assert_eq!(origin, Origin::File(a.clone()));
            }
            other => panic!("expected Delete, got {other:?}"),
        }

        // Atomic rename-over write.
        write_atomic(&a, &svc("web", 82));
        let ev = next(&mut rx).await;
        assert_eq!(port_of(&ev), 82);
        assert_eq!(file_of(&ev), a);

        // A garbage file: Invalid for it, nothing else changes.
        std::fs::write(dir.join("d.yaml"), "\t: : [\n").unwrap();
        let ev = next(&mut rx).await;
        assert!(matches!(ev, SourceEvent::Invalid { .. }), "{ev:?}");
        assert_eq!(file_of(&ev), dir.join("d.yaml"));

        // A second file defines the same Service: it was read last, so it wins; deleting it
        // brings back a.yaml's version.
        let e = dir.join("e.yaml");
        std::fs::write(&e, svc("web", 90)).unwrap();
        let ev = next(&mut rx).await;
        assert_eq!((port_of(&ev), file_of(&ev)), (90, e.clone()));
        std::fs::remove_file(&e).unwrap();
        let ev = next(&mut rx).await;
        assert_eq!((port_of(&ev), file_of(&ev)), (82, a.clone()));

        // Delete a file: its objects are deleted.
        std::fs::remove_file(&b).unwrap();
        match next(&mut rx).await {
            SourceEvent::Delete { object, .. } => assert_eq!(object, r(Kind::Node, "", "node-a")),
            other => panic!("expected Delete, got {other:?}"),
        }

        // The directory itself is replaced: the new content is read and the new directory is
        // watched.
        let new = tmp.path().join("manifests.new");
        std::fs::create_dir(&new).unwrap();
        std::fs::write(new.join("a.yaml"), svc("web", 83)).unwrap();
        std::fs::rename(&dir, tmp.path().join("manifests.old")).unwrap();
        std::fs::rename(&new, &dir).unwrap();
        let mut seen_apply = false;
        // d.yaml (garbage) is not in the new directory: nothing to report for it; the
        // Service changes. If the rescan ran while the directory was briefly absent, the
        // Service was deleted (and a directory-unreadable Invalid sent) before coming back.
        while !seen_apply {
            match next(&mut rx).await {
                ev @ SourceEvent::Apply { .. } => {
                    assert_eq!(port_of(&ev), 83);
                    seen_apply = true;
                }
                // The rename may be seen while the directory is briefly absent.
                SourceEvent::Invalid { .. } => {}
                SourceEvent::Delete { object, .. } => {
                    assert_eq!(object, r(Kind::Service, "prod", "web"));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        std::fs::write(dir.join("n.json"), NODE_JSON).unwrap();
        match next(&mut rx).await {
            SourceEvent::Apply { object, origin } => {
                assert_eq!(object_ref(&object), r(Kind::Node, "", "node-a"));
                assert_eq!(origin, Origin::File(dir.join("n.json")));
            }
            other => panic!("expected Apply, got {other:?}"),
        }

        // Closing the receiver ends the source.
        drop(rx);
        tokio::time::timeout(WAIT, task)
            .await
            .expect("source did not stop after the receiver was dropped")
            .unwrap()
            .unwrap();
    }

    /// A ConfigMap volume: files are symlinks through `..data`, which the kubelet swaps
    /// atomically to a new timestamped directory (pkg/volume/util/atomic_writer.go). Only
    /// dot-named entries change, yet the visible manifest's content does.
    #[tokio::test]
    async fn configmap_volume_symlink_swap() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir(dir.join("..v1")).unwrap();
        std::fs::write(dir.join("..v1/svc.yaml"), svc("web", 80)).unwrap();
        symlink("..v1", dir.join("..data")).unwrap();
        symlink("..data/svc.yaml", dir.join("svc.yaml")).unwrap();

        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(run(dir.to_path_buf(), tx));
        assert_eq!(port_of(&next(&mut rx).await), 80);
        assert!(matches!(next(&mut rx).await, SourceEvent::Synced));

        std::fs::create_dir(dir.join("..v2")).unwrap();
        std::fs::write(dir.join("..v2/svc.yaml"), svc("web", 81)).unwrap();
        symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        let ev = next(&mut rx).await;
        assert_eq!(port_of(&ev), 81);
        assert_eq!(file_of(&ev), dir.join("svc.yaml"));

        drop(rx);
        tokio::time::timeout(WAIT, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn missing_directory_is_an_error_at_startup() {
        let tmp = tempfile::tempdir().unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let err = run(tmp.path().join("nope"), tx).await.unwrap_err();
        assert!(format!("{err:#}").contains("nope"), "{err:#}");
    }

    #[test]
    fn unchanged_rescan_sends_nothing_and_read_errors_are_reported() {
        let dir = PathBuf::from("/m");
        let mut st = DirState::new(dir.clone());
        let listing = || {
            Ok(vec![
                (dir.join("a.yaml"), Ok(svc("web", 80).into_bytes())),
                (dir.join("b.yaml"), Err("permission denied".to_owned())),
            ])
        };
        let first = st.apply_listing(listing());
        assert_eq!(first.len(), 2, "{first:?}");
        assert!(st.apply_listing(listing()).is_empty());
        // The directory disappears: everything is deleted, reported once.
        let gone = st.apply_listing(Err(std::io::Error::from(ErrorKind::NotFound)));
        assert_eq!(gone.len(), 2, "{gone:?}");
        assert!(matches!(gone[1], SourceEvent::Delete { .. }));
        assert!(
            st.apply_listing(Err(std::io::Error::from(ErrorKind::NotFound)))
                .is_empty()
        );
    }
}
