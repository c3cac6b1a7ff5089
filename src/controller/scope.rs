//! What the operator watches: the whole cluster, or a list of namespaces.
//!
//! A namespaced install holds Roles in its namespaces only, so it cannot list
//! across the cluster: it runs one watch per namespace and per kind. The
//! controller needs a single cache of `OutboxRelay`s (it reconciles from it, and
//! the collision check and the Secret mapper read it), so the relay watches are
//! merged into one store here.
//!
//! The merge cannot hand the watch events to the store as they are. A watch
//! (re)lists with `Init`, `InitApply`… and `InitDone`, and the store answers
//! `InitDone` by replacing *everything* it holds with what that list returned:
//! one namespace's relist would wipe every other namespace's relays, and the
//! collision check would then miss them. [`ScopedInit`] rewrites each watch's
//! relist into plain `Apply`s plus a `Delete` for each relay of that watch that
//! the relist no longer returned, so a relist touches only its own namespace and
//! still forgets what was deleted while the watch was away.

use std::collections::HashSet;

use futures::stream::{self, Stream, StreamExt};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

/// Namespaces to watch; empty means the whole cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchScope {
    namespaces: Vec<String>,
}

impl WatchScope {
    /// Every namespace.
    pub fn cluster() -> Self {
        Self::default()
    }

    /// These namespaces only (sorted, without duplicates or empty names); an empty
    /// list is the whole cluster.
    pub fn namespaces<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut namespaces: Vec<String> = names
            .into_iter()
            .map(Into::into)
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        namespaces.sort();
        namespaces.dedup();
        Self { namespaces }
    }

    pub fn is_cluster(&self) -> bool {
        self.namespaces.is_empty()
    }

    /// The watched namespaces (empty for the whole cluster).
    pub fn list(&self) -> &[String] {
        &self.namespaces
    }

    /// One `Api` per watch: `Api::all` for the cluster, else one per namespace.
    pub fn apis<K>(&self, client: &Client) -> Vec<Api<K>>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        if self.is_cluster() {
            vec![Api::all(client.clone())]
        } else {
            self.namespaces
                .iter()
                .map(|ns| Api::namespaced(client.clone(), ns))
                .collect()
        }
    }
}

impl std::fmt::Display for WatchScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_cluster() {
            f.write_str("all namespaces")
        } else {
            f.write_str(&self.namespaces.join(","))
        }
    }
}

/// Rewrites one watch's events so that its relists touch only the objects that
/// watch delivered (see the module doc). Pure: the store is only read, to find
/// the objects a relist dropped.
pub struct ScopedInit<K: Resource> {
    /// Objects this watch has put into the store and not removed since.
    known: HashSet<ObjectRef<K>>,
    /// Objects the relist in progress returned; `Some` between `Init` and `InitDone`.
    relisting: Option<HashSet<ObjectRef<K>>>,
    /// Whether a relist of this watch has completed at least once.
    pub listed: bool,
}

impl<K> Default for ScopedInit<K>
where
    K: Resource,
{
    fn default() -> Self {
        Self {
            known: HashSet::new(),
            relisting: None,
            listed: false,
        }
    }
}

impl<K> ScopedInit<K>
where
    K: Resource + Clone,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    /// The events to apply to the shared store for one event of this watch.
    /// `stored` looks an object up in that store.
    pub fn rewrite(
        &mut self,
        event: watcher::Event<K>,
        stored: impl Fn(&ObjectRef<K>) -> Option<K>,
    ) -> Vec<watcher::Event<K>> {
        match event {
            watcher::Event::Apply(obj) => {
                self.known.insert(ObjectRef::from_obj(&obj));
                vec![watcher::Event::Apply(obj)]
            }
            watcher::Event::Delete(obj) => {
                self.known.remove(&ObjectRef::from_obj(&obj));
                vec![watcher::Event::Delete(obj)]
            }
            watcher::Event::Init => {
                self.relisting = Some(HashSet::new());
                Vec::new()
            }
            watcher::Event::InitApply(obj) => {
                let key = ObjectRef::from_obj(&obj);
                self.relisting.get_or_insert_with(HashSet::new).insert(key.clone());
                self.known.insert(key);
                vec![watcher::Event::Apply(obj)]
            }
            watcher::Event::InitDone => {
                let seen = self.relisting.take().unwrap_or_default();
                let gone: Vec<_> = self.known.difference(&seen).cloned().collect();
                self.known = seen;
                self.listed = true;
                gone.iter().filter_map(&stored).map(watcher::Event::Delete).collect()
            }
        }
    }
}

/// The relays of every watch in `apis`, merged into the store behind `writer`,
/// as the trigger stream for `Controller::for_stream`. The store is marked ready
/// (which releases the controller's reconciles) once every watch has listed once.
pub fn relay_triggers<K>(
    apis: Vec<Api<K>>,
    config: watcher::Config,
    writer: Writer<K>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let watches = apis.len();
    let tagged = stream::select_all(apis.into_iter().enumerate().map(|(i, api)| {
        watcher(api, config.clone())
            .default_backoff()
            .map(move |ev| (i, ev))
            .boxed()
    }));
    let reader = writer.as_reader();
    let state = Merge {
        writer,
        reader,
        watches: (0..watches).map(|_| ScopedInit::default()).collect(),
        ready: false,
    };
    stream::unfold((tagged, state), |(mut tagged, mut state)| async move {
        let (i, event) = tagged.next().await?;
        let triggers = match event {
            Ok(event) => state.apply(i, event).into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        };
        Some((stream::iter(triggers), (tagged, state)))
    })
    .flatten()
}

struct Merge<K: Resource + Clone + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    writer: Writer<K>,
    reader: Store<K>,
    watches: Vec<ScopedInit<K>>,
    ready: bool,
}

impl<K> Merge<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    /// Applies one event of watch `i` to the store; returns the objects to reconcile.
    fn apply(&mut self, i: usize, event: watcher::Event<K>) -> Vec<K> {
        let reader = &self.reader;
        let rewritten = self.watches[i].rewrite(event, |key| reader.get(key).map(|o| (*o).clone()));
        let mut triggers = Vec::new();
        for ev in rewritten {
            self.writer.apply_watcher_event(&ev);
            if let watcher::Event::Apply(obj) = ev {
                triggers.push(obj);
            }
        }
        if !self.ready && self.watches.iter().all(|w| w.listed) {
            // The store becomes ready only through a list's InitDone, which also
            // replaces its contents: hand it the contents it already has.
            self.writer.apply_watcher_event(&watcher::Event::Init);
            for obj in self.reader.state() {
                self.writer
                    .apply_watcher_event(&watcher::Event::InitApply((*obj).clone()));
            }
            self.writer.apply_watcher_event(&watcher::Event::InitDone);
            self.ready = true;
        }
        triggers
    }
}

/// Metadata of every object in the watches of `apis` (an `Api` of
/// `PartialObjectMeta` asks the API server for metadata only), merged: a trigger
/// stream for `owns_stream` and `watches_stream`, with no store.
pub fn metadata_triggers<K>(
    apis: Vec<Api<PartialObjectMeta<K>>>,
    config: watcher::Config,
) -> impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Clone + Send + Sync,
    PartialObjectMeta<K>: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    stream::select_all(
        apis.into_iter()
            .map(|api| watcher(api, config.clone()).default_backoff().touched_objects().boxed()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::OutboxRelay;

    fn relay(ns: &str, name: &str) -> OutboxRelay {
        let mut r = OutboxRelay::test();
        r.metadata.namespace = Some(ns.into());
        r.metadata.name = Some(name.into());
        r
    }

    fn names(store: &Store<OutboxRelay>) -> Vec<String> {
        let mut v: Vec<String> = store
            .state()
            .iter()
            .map(|r| {
                format!(
                    "{}/{}",
                    r.metadata.namespace.as_deref().unwrap_or(""),
                    r.metadata.name.as_deref().unwrap_or("")
                )
            })
            .collect();
        v.sort();
        v
    }

    fn list(m: &mut Merge<OutboxRelay>, i: usize, objs: &[OutboxRelay]) -> Vec<OutboxRelay> {
        let mut triggered = m.apply(i, watcher::Event::Init);
        for o in objs {
            triggered.extend(m.apply(i, watcher::Event::InitApply(o.clone())));
        }
        triggered.extend(m.apply(i, watcher::Event::InitDone));
        triggered
    }

    fn merge(watches: usize) -> Merge<OutboxRelay> {
        let writer = Writer::default();
        let reader = writer.as_reader();
        Merge {
            writer,
            reader,
            watches: (0..watches).map(|_| ScopedInit::default()).collect(),
            ready: false,
        }
    }

    #[test]
    fn one_namespaces_relist_does_not_forget_another_namespaces_relays() {
        let mut m = merge(2);
        list(&mut m, 0, &[relay("a", "r1"), relay("a", "r2")]);
        list(&mut m, 1, &[relay("b", "r1")]);
        assert_eq!(names(&m.reader), ["a/r1", "a/r2", "b/r1"]);
        // Namespace a's watch lost its place and relists; r2 was deleted meanwhile.
        let triggered = list(&mut m, 0, &[relay("a", "r1")]);
        assert_eq!(
            names(&m.reader),
            ["a/r1", "b/r1"],
            "b's relay must survive a's relist; a/r2 must go"
        );
        assert_eq!(triggered.len(), 1, "the relisted relay is reconciled again");
    }

    #[test]
    fn the_store_is_ready_only_when_every_watch_has_listed() {
        let mut m = merge(2);
        list(&mut m, 0, &[relay("a", "r1")]);
        assert!(!m.ready);
        assert!(futures::FutureExt::now_or_never(m.reader.wait_until_ready()).is_none());
        list(&mut m, 1, &[]);
        assert!(m.ready);
        assert!(futures::FutureExt::now_or_never(m.reader.wait_until_ready()).is_some());
        // Marking it ready kept what the lists had returned.
        assert_eq!(names(&m.reader), ["a/r1"]);
    }

    #[test]
    fn plain_events_pass_through_and_are_tracked_for_the_next_relist() {
        let mut m = merge(1);
        list(&mut m, 0, &[]);
        assert_eq!(m.apply(0, watcher::Event::Apply(relay("a", "new"))).len(), 1);
        assert_eq!(names(&m.reader), ["a/new"]);
        // A relist that no longer returns it deletes it: the watch had applied it.
        list(&mut m, 0, &[]);
        assert!(names(&m.reader).is_empty());
        m.apply(0, watcher::Event::Apply(relay("a", "x")));
        assert!(m.apply(0, watcher::Event::Delete(relay("a", "x"))).is_empty());
        assert!(names(&m.reader).is_empty());
    }

    #[test]
    fn scope_normalizes_its_namespace_list() {
        assert!(WatchScope::namespaces(Vec::<String>::new()).is_cluster());
        assert!(WatchScope::namespaces([" ", ""]).is_cluster());
        let s = WatchScope::namespaces(["b", "a", " a ", "b"]);
        assert_eq!(s.list(), ["a", "b"]);
        assert_eq!(s.to_string(), "a,b");
        assert_eq!(WatchScope::cluster().to_string(), "all namespaces");
    }
}
