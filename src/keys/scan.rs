//! The scan that builds the index: every object of the token read once, grouped into keys,
//! interrupted changes finished, hsmkeyd's own objects noted ([`Reserved`]), superseded and
//! v1 records handed to the worker.

use super::*;

/// One full scan: group objects into keys, finish interrupted label changes, and hand
/// superseded and v1 records to the worker.
/// What a scan reads the token with.
pub(super) struct Scanner {
    pub(super) hsm: Hsm,
    pub(super) shared: Arc<Shared>,
    pub(super) chores: worker::Chores,
    pub(super) unreadable: Arc<AtomicUsize>,
    /// Records the index holds ahead of the token (dirty ones, waiting for the worker):
    /// a rescan keeps them, and a marker they have finished is not taken for a crash.
    /// Empty at the opening scan.
    pub(super) ahead: HashMap<Kid, MetaSlot>,
}

/// What one scan found.
pub(super) struct Scan {
    /// The login generation the handles belong to.
    pub(super) generation: u64,
    pub(super) index: BTreeMap<Kid, Arc<Entry>>,
    /// hsmkeyd's own objects.
    pub(super) reserved: Reserved,
}

impl Scanner {
    pub(super) fn scan(&self) -> Result<Scan, HsmError> {
        let generation = self.hsm.login_generation();
        let mut reserved = Reserved::default();
        let index = scan_index(self, generation, &mut reserved)?;
        Ok(Scan {
            generation,
            index,
            reserved,
        })
    }
}

fn scan_index(
    scanner: &Scanner,
    generation: u64,
    reserved: &mut Reserved,
) -> Result<BTreeMap<Kid, Arc<Entry>>, HsmError> {
    let Scanner {
        hsm,
        shared,
        chores,
        unreadable,
        ahead,
    } = scanner;
    let scanned = hsm.scan(&[
        meta::APPLICATION,
        meta::APPLICATION_V1,
        audit_mark::APPLICATION,
    ])?;
    for o in &scanned.objects {
        reserved.note(o);
    }
    unreadable.store(scanned.unreadable, std::sync::atomic::Ordering::Relaxed);
    if scanned.unreadable > 0 {
        tracing::warn!(
            objects = scanned.unreadable,
            "objects of the token could not be read and are not served"
        );
    }
    let (groups, skipped) = entry::group(scanned.objects);
    if skipped > 0 {
        tracing::warn!(
            objects = skipped,
            "key objects without a usable CKA_ID (empty or over 128 bytes) are not served"
        );
    }
    let mut index = BTreeMap::new();
    chores.forget_all();
    for (kid, group) in groups {
        let mine = ahead.get(&kid);
        let settled = settle::settle(hsm, &kid, group, &shared.label_limit, mine.is_some());
        if let Some(mut e) = settled.map(|e| keep_ahead(&kid, mine, e)) {
            chores.superseded(generation, &kid, std::mem::take(&mut e.stale));
            if e.meta.as_ref().is_some_and(|m| m.dirty) {
                chores.dirty(&kid);
            }
            let _ = index.insert(kid, Arc::new(e));
        }
    }
    Ok(index)
}

impl Group {
    pub(super) fn new(
        objects: Vec<crate::hsm::ObjectInfo>,
        metas: Vec<crate::hsm::ObjectInfo>,
    ) -> Group {
        Group { objects, metas }
    }
}

/// The entry a scan built, with the record the index held ahead of the token (`ahead`)
/// unless the token's is newer: the token's objects and record objects, the index's record,
/// still dirty. (The index's handles may belong to an earlier login; the scan's are used.)
fn keep_ahead(kid: &Kid, ahead: Option<&MetaSlot>, fresh: Entry) -> Entry {
    let Some(ahead) = ahead else {
        return fresh;
    };
    let slot = match fresh.meta.as_deref() {
        Some(m) if m.record.seq > ahead.record.seq => return fresh,
        Some(m) => MetaSlot {
            record: ahead.record.clone(),
            dirty: true,
            ..m.clone()
        },
        None => MetaSlot {
            object: None,
            spare: None,
            record: ahead.record.clone(),
            dirty: true,
            ..ahead.clone()
        },
    };
    let stale = fresh.stale.clone();
    match Entry::assemble(kid, fresh.objects.clone(), Some(Box::new(slot)), None) {
        Some(mut e) => {
            e.stale = stale;
            e
        }
        None => fresh,
    }
}
