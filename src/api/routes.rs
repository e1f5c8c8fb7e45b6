//! The route table: every route the API serves, registered in one place. A `read` route is
//! GET only; a `change` route cannot be registered without the audit event its answers are
//! recorded under, so a changing route is audited by construction (and
//! `tests/routes_audited.rs` walks [`routes`] to check it).

use axum::extract::Request;
use axum::handler::Handler;
use axum::middleware::{self, Next};
use axum::routing::{get, on, MethodFilter, MethodRouter};
use axum::Router;

use super::audited::{self, RouteEvent};
use super::{
    audit_key, authenticate, batch, by_label, deadline, encedo, get_key, lifecycle, list_keys,
    method_not_allowed, no_route, openapi, patch_key, status, tokens, AppState,
};
use crate::audit::Event;

/// One route as registered: method, path, and the audit event of a changing route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteInfo {
    /// `GET`, `POST`, `PATCH`, ...
    pub method: &'static str,
    /// The path pattern, e.g. `/v1/keys/{kid}`.
    pub path: &'static str,
    /// What its answers are recorded as; `None` for reads (successful reads are not audited).
    pub event: Option<Event>,
}

struct Route {
    info: RouteInfo,
    handler: MethodRouter<AppState>,
}

/// A route that only reads: GET only, so it cannot change anything unaudited.
fn read<H: Handler<T, AppState>, T: 'static>(path: &'static str, h: H) -> Route {
    Route {
        info: RouteInfo {
            method: "GET",
            path,
            event: None,
        },
        handler: get(h),
    }
}

/// A POST that only reads (the Encedo search sends its query as a body). Like a [`read`]
/// route it has no audit event: successful reads are not audited, refusals are (401/403).
/// Its handler gets no [`UpdateRequest`], so it cannot reach [`run_change`]; the route
/// table test lists each such route by name.
fn read_posted<H: Handler<T, AppState>, T: 'static>(path: &'static str, h: H) -> Route {
    Route {
        info: RouteInfo {
            method: "POST",
            path,
            event: None,
        },
        handler: on(MethodFilter::POST, h),
    }
}

/// A route that changes something. Its audit event is part of its registration: every
/// answer it gives (errors included) carries the event, and the audit layer records it.
fn change<H: Handler<T, AppState>, T: 'static>(
    method: MethodFilter,
    name: &'static str,
    path: &'static str,
    event: Event,
    h: H,
) -> Route {
    let handler = on(method, h).layer(middleware::from_fn(
        move |mut req: Request, next: Next| async move {
            let _ = req.extensions_mut().insert(RouteEvent(event));
            let mut resp = next.run(req).await;
            let _ = resp.extensions_mut().insert(RouteEvent(event));
            resp
        },
    ));
    Route {
        info: RouteInfo {
            method: name,
            path,
            event: Some(event),
        },
        handler,
    }
}

/// Every route, in one table: the router is built from it, and tests walk it.
fn table() -> Vec<Route> {
    vec![
        read("/v1/keys", list_keys),
        change(
            MethodFilter::POST,
            "POST",
            "/v1/keys",
            Event::KeyCreated,
            lifecycle::create,
        ),
        change(
            MethodFilter::POST,
            "POST",
            "/v1/keys/batch",
            Event::KeysBatchChanged,
            batch::post,
        ),
        read("/v1/keys/{kid}", get_key),
        change(
            MethodFilter::DELETE,
            "DELETE",
            "/v1/keys/{kid}",
            Event::KeyDeleted,
            lifecycle::delete,
        ),
        read("/v1/keys/{kid}/public", lifecycle::public_key),
        read("/v1/keys/by-label/{label}", by_label::get),
        read("/v1/jwks", lifecycle::jwks),
        change(
            MethodFilter::PATCH,
            "PATCH",
            "/v1/keys/by-label/{label}",
            Event::KeyAttributesChanged,
            by_label::patch,
        ),
        change(
            MethodFilter::DELETE,
            "DELETE",
            "/v1/keys/by-label/{label}",
            Event::KeyDeleted,
            by_label::delete,
        ),
        change(
            MethodFilter::PATCH,
            "PATCH",
            "/v1/keys/{kid}",
            Event::KeyAttributesChanged,
            patch_key,
        ),
        change(
            MethodFilter::POST,
            "POST",
            "/v1/auth/token",
            Event::TokenIssued,
            tokens::mint,
        ),
        read(tokens::JWKS_PATH, tokens::jwks),
        read("/v1/status", status),
        read("/v1/audit/key", audit_key),
        read(openapi::PATH, openapi::serve),
        change(
            MethodFilter::POST,
            "POST",
            "/api/keymgmt/update",
            Event::KeyAttributesChanged,
            encedo::update,
        ),
        change(
            MethodFilter::POST,
            "POST",
            "/api/keymgmt/create",
            Event::KeyCreated,
            encedo::create,
        ),
        change(
            MethodFilter::DELETE,
            "DELETE",
            "/api/keymgmt/delete/{kid}",
            Event::KeyDeleted,
            encedo::delete,
        ),
        read_posted("/api/keymgmt/search", encedo::search),
        read("/api/keymgmt/list/{offset}/{limit}", encedo::list),
        read("/api/keymgmt/list/{offset}", encedo::list_default),
        read("/api/keymgmt/get/{kid}", encedo::get),
        read(encedo::LOGIN_PATH, encedo::challenge),
        change(
            MethodFilter::POST,
            "POST",
            encedo::LOGIN_PATH,
            Event::AuthSuccessInternal,
            encedo::login,
        ),
        read(encedo::VERSION_PATH, encedo::version),
        read(encedo::STATUS_PATH, encedo::status),
    ]
}

/// The routes the router serves.
pub fn routes() -> Vec<RouteInfo> {
    table().into_iter().map(|r| r.info).collect()
}

/// Builds the router. The listener must put the connection's [`Peer`] into each request's
/// extensions.
pub fn router(state: AppState) -> Router {
    table()
        .into_iter()
        .fold(Router::new(), |r, route| {
            r.route(route.info.path, route.handler)
        })
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_route)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            deadline::layer,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            audited::layer,
        ))
        .with_state(state)
}
