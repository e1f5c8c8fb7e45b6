//! `POST /v1/keys/batch`: one patch for many keys, all checked before any is written (see
//! `keys/batch.rs` for the order of work). This file owns the request's shape, the answer,
//! and the batch's audit side: every key's entries are a single update's
//! ([`UpdateAudit`], marked with the batch id), and the batch gets one entry of its own
//! (`KEYS_BATCH_CHANGED`), written from the batch's task, so a client that goes away
//! cannot leave the batch half-done or unrecorded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use axum::http::{header, HeaderMap, Uri};
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::audited::{self, AuditFacts, Audited, Caller, UpdateAudit};
use super::body;
use super::change::UpdateRequest;
use super::error::ApiError;
use crate::audit::{caller, Entry, Event, Outcome};
use crate::auth::Principal;
use crate::keys::model::{Kid, RoleName};
use crate::keys::{
    Actor, Batch, BatchDone, BatchError, BatchFailure, BatchHooks, Field, FieldChange, KeyError,
    KeyPatch, Phase, Refusal, Selector, UpdateOutcome, MAX_BATCH,
};
use crate::sync;
use crate::values::Scope;

/// Largest batch body: a thousand kids with their etags fit.
pub(super) const MAX_BATCH_BODY: usize = 256 * 1024;

/// The handler.
pub(super) async fn post(
    u: UpdateRequest,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Audited {
    let mut facts = AuditFacts::default();
    let result = post_inner(&u, &mut facts, uri.query(), &headers, body).await;
    Audited(facts, result)
}

async fn post_inner(
    u: &UpdateRequest,
    facts: &mut AuditFacts,
    query: Option<&str>,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let dry_run = body::dry_run(query)?;
    if !u.principal.may_update_some() {
        return Err(ApiError::missing_scope(&format!(
            "{} or {}:<kid>",
            Scope::KeysUpdate,
            Scope::KeysUpdate
        )));
    }
    if headers.contains_key(header::IF_MATCH) {
        return Err(ApiError::bad_field(
            "invalid_if_match",
            "If-Match",
            "a batch takes its etags in the body's if_match object, not an If-Match header",
        ));
    }
    let mut batch = parse(body::json_object_within(headers, body, MAX_BATCH_BODY).await?)?;
    batch.dry_run = dry_run;
    let hooks = Arc::new(BatchAudit {
        audit: u.state.audit.clone(),
        request: u.request.clone(),
        caller: Caller {
            principal: u.principal.name.clone(),
            token_id: u.principal.token_id.clone(),
        },
        principal: u.principal.clone(),
        batch_id: format!("{:032x}", rand::random::<u128>()),
        dry_run,
        keys: Mutex::new(HashMap::new()),
    });
    let actor = Actor {
        roles: u.principal.roles.clone(),
    };
    let keys = u.state.keys.clone();
    // From here the batch's task writes every entry, whatever the client does. It runs on
    // the main runtime, whose blocking pool takes its writes at once.
    facts.recorded = true;
    let task = crate::blocking::spawn_pooled(&u.state.tasks, async move {
        let result = keys.update_batch(batch, &actor, hooks.clone()).await;
        hooks.finish(result).await
    });
    let answer = task
        .await
        .map_err(|e| ApiError::internal(&format!("batch task failed: {e}")))??;
    Ok(super::reply::reply(answer))
}

/// The request body: `select`, `patch`, `if_match`.
fn parse(body: Map<String, Value>) -> Result<Batch, ApiError> {
    let (mut select, mut patch, mut if_match) = (None, None, BTreeMap::new());
    for (name, value) in body {
        match name.as_str() {
            "select" => select = Some(selector(value)?),
            "patch" => patch = Some(batch_patch(value)?),
            "if_match" => if_match = etags(value)?,
            other => {
                return Err(ApiError::bad_field(
                    "unknown_field",
                    other,
                    format!("unknown field {other:?}; a batch takes select, patch and if_match"),
                ))
            }
        }
    }
    let select = select
        .ok_or_else(|| ApiError::bad_field("missing_select", "select", "a batch needs select"))?;
    let patch = patch
        .ok_or_else(|| ApiError::bad_field("missing_patch", "patch", "a batch needs patch"))?;
    Ok(Batch {
        select,
        patch,
        if_match,
        dry_run: false,
    })
}

fn selector(value: Value) -> Result<Selector, ApiError> {
    let bad = |code, message: &str| ApiError::bad_field(code, "select", message);
    let Value::Object(map) = value else {
        return Err(bad("invalid_select", "select must be an object"));
    };
    let mut it = map.into_iter();
    let (name, v) = match (it.next(), it.next()) {
        (None, _) => {
            return Err(bad(
                "empty_select",
                "select names no keys; send one of kids, label_prefix, role",
            ))
        }
        (Some(one), None) => one,
        (Some(_), Some(_)) => {
            return Err(bad(
                "ambiguous_select",
                "select takes exactly one of kids, label_prefix, role",
            ))
        }
    };
    match (name.as_str(), v) {
        ("kids", Value::Array(items)) => {
            let field = "select.kids";
            if items.is_empty() {
                return Err(ApiError::bad_field(
                    "empty_select",
                    field,
                    "kids names no key",
                ));
            }
            if items.len() > MAX_BATCH {
                return Err(ApiError::bad_field(
                    "too_many_keys",
                    field,
                    format!(
                        "kids names {} keys; a batch changes at most {MAX_BATCH}",
                        items.len()
                    ),
                ));
            }
            let mut kids = BTreeSet::new();
            for item in items {
                let kid = item
                    .as_str()
                    .ok_or_else(|| {
                        ApiError::bad_field("invalid_kid", field, "every kid must be a string")
                    })
                    .and_then(|s| {
                        Kid::parse(s).map_err(|e| ApiError::bad_field("invalid_kid", field, e))
                    })?;
                if !kids.insert(kid.clone()) {
                    return Err(ApiError::bad_field(
                        "duplicate_kid",
                        field,
                        format!("kid {kid} is named twice"),
                    ));
                }
            }
            Ok(Selector::Kids(kids))
        }
        ("label_prefix", Value::String(p)) if !p.is_empty() => Ok(Selector::LabelPrefix(p)),
        ("label_prefix", _) => Err(ApiError::bad_field(
            "invalid_label_prefix",
            "select.label_prefix",
            "label_prefix must be a non-empty string",
        )),
        ("role", Value::String(r)) => RoleName::parse(&r)
            .map(Selector::Role)
            .map_err(|e| ApiError::bad_field("invalid_role", "select.role", e)),
        ("kids" | "role", _) => Err(ApiError::bad_field(
            "invalid_select",
            &format!("select.{name}"),
            "kids is an array of kids, role a role name",
        )),
        (other, _) => Err(ApiError::bad_field(
            "unknown_field",
            &format!("select.{other}"),
            format!("unknown selector {other:?}; select takes kids, label_prefix or role"),
        )),
    }
}

/// The patch: a single update's fields, parsed by the single update's parser, but no
/// label (a batch giving many keys one label is almost always a mistake).
fn batch_patch(value: Value) -> Result<KeyPatch, ApiError> {
    let Value::Object(map) = value else {
        return Err(ApiError::bad_field(
            "invalid_patch",
            "patch",
            "patch must be an object",
        ));
    };
    if map.contains_key(Field::Label.name()) {
        return Err(ApiError::bad_field(
            "label_not_batchable",
            "patch.label",
            "a batch cannot change labels; rename keys one at a time",
        ));
    }
    if map.is_empty() {
        return Err(ApiError::bad_field(
            "empty_patch",
            "patch",
            "patch names no field",
        ));
    }
    body::key_patch(map).map_err(|e| e.within("patch"))
}

/// `if_match`: kid -> etag (as the ETag header shows it, quoted or not).
fn etags(value: Value) -> Result<BTreeMap<Kid, String>, ApiError> {
    let bad = |m: &str| ApiError::bad_field("invalid_if_match", "if_match", m);
    let Value::Object(map) = value else {
        return Err(bad("if_match must be an object of kid -> etag"));
    };
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let kid = Kid::parse(&k).map_err(|e| ApiError::bad_field("invalid_kid", "if_match", e))?;
        let Value::String(tag) = v else {
            return Err(bad("every etag in if_match must be a string"));
        };
        let tag = tag.trim_start_matches("W/").trim_matches('"').to_string();
        if tag.is_empty() {
            return Err(bad("an etag in if_match is empty"));
        }
        if tag == "*" {
            // As `If-Match: *` on a PATCH: any existing key matches.
            continue;
        }
        if out.insert(kid.clone(), tag).is_some() {
            return Err(bad(&format!("if_match names key {kid} twice")));
        }
    }
    Ok(out)
}

/// The audit side of one batch, and the caller's scope per key.
struct BatchAudit {
    audit: Arc<crate::audit::Auditor>,
    request: audited::RequestFacts,
    caller: Caller,
    principal: Arc<Principal>,
    batch_id: String,
    dry_run: bool,
    /// Each key's entries, as a single update writes them (one set per phase).
    keys: Mutex<HashMap<(Kid, Phase), Arc<UpdateAudit>>>,
}

impl BatchAudit {
    fn of(&self, kid: &Kid, phase: Phase) -> Arc<UpdateAudit> {
        sync::lock(&self.keys)
            .entry((kid.clone(), phase))
            .or_insert_with(|| {
                let a = UpdateAudit::new(
                    self.audit.clone(),
                    self.request.clone(),
                    self.caller.clone(),
                    kid.to_string(),
                    Event::KeyAttributesChanged,
                    self.dry_run,
                );
                a.in_batch(&self.batch_id, phase == Phase::Rollback);
                a
            })
            .clone()
    }

    /// Writes what the hooks did not (entries of refused, unchanged and dry-run keys, and
    /// the batch's own), and returns the answer's body.
    async fn finish(&self, result: Result<BatchDone, BatchError>) -> Result<Value, ApiError> {
        match result {
            Ok(done) => self.finish_done(done).await,
            Err(BatchError::Refused { failures, selected }) => {
                let mut listed = Vec::new();
                for (kid, why) in &failures {
                    let e = match why {
                        Refusal::NotPermitted => ApiError::missing_scope(&format!(
                            "{} or {}",
                            Scope::KeysUpdate,
                            Scope::KeysUpdateOne(kid.clone())
                        )),
                        Refusal::Key(e) => ApiError::from(e.clone()),
                    };
                    // The key's own entry; its refusal is the answer whatever it says.
                    let _ = self.of(kid, Phase::Write).finish(Err(e.clone())).await;
                    listed.push(failure_json(kid, &e));
                }
                let e = ApiError::batch_refused(
                    failures.len(),
                    selected,
                    self.details([("failures", Value::Array(listed))]),
                );
                self.batch_entry(Some(&e), e.message().to_string()).await?;
                Err(e)
            }
            Err(BatchError::Failed(f)) => self.finish_failed(f).await,
            Err(BatchError::InvalidPatch(e)) => {
                let e = ApiError::from(e).within("patch");
                self.batch_entry(Some(&e), e.message().to_string()).await?;
                Err(e)
            }
            Err(BatchError::Invalid(e) | BatchError::Unavailable(e)) => {
                let e = ApiError::from(e);
                self.batch_entry(Some(&e), e.message().to_string()).await?;
                Err(e)
            }
        }
    }

    async fn finish_done(&self, done: BatchDone) -> Result<Value, ApiError> {
        let mut unrecorded = false;
        let mut keys = Vec::new();
        let mut changed = 0;
        for (kid, outcome) in done.keys {
            // Writes to the journal only for a key the hooks did not record (one that
            // needed no change, or a dry run).
            match self.of(&kid, Phase::Write).finish(Ok(outcome)).await {
                Ok(o) => {
                    changed += usize::from(!o.changes.is_empty());
                    keys.push(key_json(&o, self.dry_run));
                }
                Err(_) => unrecorded = true,
            }
        }
        let message = format!(
            "{} of {} keys {}",
            changed,
            keys.len(),
            if self.dry_run {
                "would change"
            } else {
                "changed"
            }
        );
        let written = self.batch_entry(None, message).await;
        if unrecorded || (written.is_err() && (self.dry_run || changed == 0)) {
            return Err(ApiError::audit_unavailable());
        }
        let mut body = json!({ "batch_id": self.batch_id, "keys": keys });
        if self.dry_run {
            body["dry_run"] = Value::Bool(true);
        }
        Ok(body)
    }

    async fn finish_failed(&self, f: BatchFailure) -> Result<Value, ApiError> {
        let mut failed = Vec::new();
        for (kid, e) in &f.failed {
            let e = ApiError::from(e.clone());
            let _ = self.of(kid, Phase::Write).finish(Err(e.clone())).await;
            failed.push(failure_json(kid, &e));
        }
        let cause = f
            .failed
            .first()
            .map(|(_, e)| ApiError::from(e.clone()))
            .unwrap_or_else(ApiError::token_unavailable);
        let kids = |l: &[Kid]| Value::Array(l.iter().map(|k| json!(k.to_string())).collect());
        let not_rolled_back: Vec<Value> = f
            .not_rolled_back
            .iter()
            .map(|(k, e)| failure_json(k, &ApiError::from(e.clone())))
            .collect();
        let message = if f.not_rolled_back.is_empty() {
            format!(
                "the token failed part-way ({}); the {} keys already changed were set back \
                 and no key is changed",
                cause.message(),
                f.rolled_back.len()
            )
        } else {
            format!(
                "the token failed part-way ({}); {} keys were set back, but {} could not be \
                 and stay changed or blocked: {}",
                cause.message(),
                f.rolled_back.len(),
                f.not_rolled_back.len(),
                f.not_rolled_back
                    .iter()
                    .map(|(k, _)| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let e = ApiError::batch_failed(
            &cause,
            message,
            self.details([
                ("failures", Value::Array(failed)),
                ("rolled_back", kids(&f.rolled_back)),
                ("not_rolled_back", Value::Array(not_rolled_back)),
                ("not_started", kids(&f.not_started)),
            ]),
        );
        // The per-key entries record every write and rollback; a missing batch entry
        // does not change what happened.
        if let Err(err) = self.batch_entry(Some(&e), e.message().to_string()).await {
            tracing::error!(batch_id = %self.batch_id, error = %err.message(),
                "the entry of a failed batch was not recorded");
        }
        Err(e)
    }

    fn details<const N: usize>(&self, members: [(&str, Value); N]) -> Map<String, Value> {
        let mut m = Map::new();
        let _ = m.insert("batch_id".into(), json!(self.batch_id));
        for (k, v) in members {
            let _ = m.insert(k.into(), v);
        }
        m
    }

    /// The batch's own entry: `KEYS_BATCH_CHANGED`, with the batch id.
    async fn batch_entry(&self, error: Option<&ApiError>, what: String) -> Result<(), ApiError> {
        let who = caller(Some(&self.caller.principal), self.request.peer.as_deref());
        let outcome = error.map_or(Outcome::Ok, ApiError::outcome);
        let status = error.map_or(200, ApiError::status);
        let mut message = match error {
            None => format!("batch {} by {who}: {what}: OK", self.batch_id),
            Some(e) => format!(
                "batch {} by {who} refused ({status} {}): {what}: {}",
                self.batch_id,
                e.code(),
                outcome.name()
            ),
        };
        if self.dry_run {
            message = format!("dry run: {message}");
        }
        let mut e = Entry::new(Event::KeysBatchChanged, outcome, message);
        e.status = Some(status);
        e.principal = Some(self.caller.principal.clone());
        e.peer = self.request.peer.clone();
        e.token_id = self.caller.token_id.clone();
        e.request_id = Some(self.request.rid.0.clone());
        e.error = error.map(|e| e.code().to_string());
        e.request = Some(self.request.request.clone());
        e.batch_id = Some(self.batch_id.clone());
        e.dry_run = self.dry_run;
        self.audit.write_async(e).await.map_err(|err| {
            tracing::error!(batch_id = %self.batch_id, error = %err,
                "the entry of a batch was not recorded");
            ApiError::audit_unavailable()
        })
    }
}

impl BatchHooks for BatchAudit {
    fn permitted(&self, kid: &Kid) -> bool {
        self.principal.may_update(kid)
    }

    fn before_write(&self, kid: &Kid, phase: Phase, changes: &[FieldChange]) -> Result<(), String> {
        (self.of(kid, phase).intent_hook())(changes)
    }

    fn after_write(&self, kid: &Kid, phase: Phase, outcome: Result<&[FieldChange], &KeyError>) {
        (self.of(kid, phase).result_hook(ApiError::from))(outcome)
    }

    /// The single update's parser, given each changed field's value from before (an
    /// empty role list is written as null, which is how a patch clears roles).
    fn inverse(&self, changes: &[FieldChange]) -> Option<KeyPatch> {
        let mut m = Map::new();
        for c in changes {
            let before = match (&c.field, &c.before) {
                (Field::Roles, Value::Array(a)) if a.is_empty() => Value::Null,
                (_, v) => v.clone(),
            };
            let _ = m.insert(c.field.name().to_string(), before);
        }
        body::key_patch(m).ok()
    }
}

fn failure_json(kid: &Kid, e: &ApiError) -> Value {
    let mut v = json!({
        "kid": kid.to_string(),
        "status": e.status(),
        "error": e.code(),
        "message": e.message(),
    });
    if let Some(f) = e.field() {
        v["field"] = json!(f);
    }
    v
}

fn key_json(o: &UpdateOutcome, dry_run: bool) -> Value {
    let changed: Vec<&str> = o.changes.iter().map(|c| c.field.name()).collect();
    let mut v = json!({ "kid": o.key.kid.to_string(), "changed": changed, "key": o.key });
    if dry_run {
        v["changes"] = audited::changes_json(&o.changes);
    }
    v
}
