//! The demo page at `/`, the browser client at `/client/herald.js`, and the dev-only
//! endpoints the page uses to mint tokens and send itself test messages.
//!
//! The client file is `clients/js/herald.js`, embedded at build time, so the page and
//! any app can load the exact client this herald was built with. The dev endpoints
//! (`/dev/…`) exist only when herald generated its own secrets (dev mode): they sign
//! tokens for any user name, which is what a demo needs and what production must never
//! offer. They also answer only clients on a loopback address, so a dev-mode herald
//! bound to `0.0.0.0` does not hand out tokens to its network.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, Extensions, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use crate::app::AppState;
use crate::channel::{unix_to_rfc3339, Channel, ChannelKind, Draft};
use crate::config::MembershipMode;
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, User};
use crate::http::server::Peer;
use crate::ids::{OrgId, UserId};

/// The browser client, as served at `/client/herald.js`.
pub const CLIENT_JS: &str = include_str!("../../../../clients/js/herald.js");

/// Its TypeScript declarations, as served at `/client/herald.d.ts`.
pub const CLIENT_DTS: &str = include_str!("../../../../clients/js/herald.d.ts");

/// The demo page; `{{CONFIG}}` is replaced by the page's JSON settings.
const PAGE: &str = include_str!("demo/index.html");

/// How long a token minted by `POST /dev/token` is valid.
pub const DEV_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// The page (unless `HERALD_DEMO_PAGE=false`), the client and its types; the client
/// files answer CORS requests through `cors`, so pages on other origins can import them.
pub fn router(cors: tower_http::cors::CorsLayer) -> Router<AppState> {
    Router::new()
        .route("/client/herald.js", get(client_js))
        .route("/client/herald.d.ts", get(client_dts))
        .layer(cors)
        .route("/", get(page))
        .route("/favicon.ico", get(favicon))
}

/// herald has no icon: 204 keeps browsers from logging a 404 for every page load.
async fn favicon() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// The dev-only endpoints. `crate::router` merges them only in dev mode, so with
/// configured secrets they do not exist (404 like any unknown path).
pub fn dev_router() -> Router<AppState> {
    Router::new()
        .route("/dev/token", post(mint_token))
        .route("/dev/notify", post(notify_self))
        .route("/dev/orgs/{org_id}/events", post(org_event))
}

/// The LLM provider the page names: `echo` or the configured model.
fn provider(state: &AppState) -> Value {
    match &state.config.llm_base_url {
        Some(_) => json!({"name": "openai-compatible", "model": state.config.llm_model}),
        None => json!({"name": "echo", "model": Value::Null}),
    }
}

async fn page(State(state): State<AppState>) -> Response {
    if !state.config.demo_page {
        return ApiError::NotFound("the demo page is off (HERALD_DEMO_PAGE=false)".to_owned())
            .into_response();
    }
    let config = json!({
        "dev": state.dev_jwt_secret.is_some(),
        "provider": provider(&state),
    });
    // `<` is escaped so that no value can close the <script> element it sits in.
    let config = config.to_string().replace('<', "\\u003c");
    (
        [(header::CACHE_CONTROL, "no-cache")],
        Html(PAGE.replace("{{CONFIG}}", &config)),
    )
        .into_response()
}

async fn client_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        CLIENT_JS,
    )
        .into_response()
}

async fn client_dts() -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/typescript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        CLIENT_DTS,
    )
        .into_response()
}

/// Refuses callers that are not on this machine.
fn require_loopback(peer: Option<SocketAddr>) -> Result<(), ApiError> {
    match peer {
        Some(addr) if addr.ip().is_loopback() => Ok(()),
        _ => Err(ApiError::Forbidden(
            "dev endpoints answer only clients on this machine (a loopback address); \
             mint tokens with `herald token --sub USER` instead"
                .to_owned(),
        )),
    }
}

/// Refuses requests whose `Host` is not this machine by name (`localhost`, `127.0.0.1`
/// or `[::1]`, any port): a page on another site that rebinds its DNS name to
/// 127.0.0.1 reaches a loopback peer check, but keeps its own name in `Host`.
fn require_local_host(headers: &HeaderMap) -> Result<(), ApiError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(host), None) => host.to_str().unwrap_or(""),
        _ => "",
    };
    let name = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    let local = ["localhost", "127.0.0.1", "[::1]"]
        .iter()
        .any(|allowed| name.eq_ignore_ascii_case(allowed));
    if local {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "dev endpoints answer only requests for localhost, 127.0.0.1 or [::1] (the Host header); \
             open the demo page at http://localhost:<port>/"
                .to_owned(),
        ))
    }
}

/// `{"user_id","org_id"?,"org_ids"?}` → `200 {"token","user_id","org_id","org_ids","expires_at"}`.
/// The token names every org given (`org_id`, then `org_ids`) in its `orgs` claim and,
/// with database membership, the user is made a member of each, so the page can follow
/// their events.
async fn mint_token(
    State(state): State<AppState>,
    extensions: Extensions,
    headers: HeaderMap,
    ApiJson(body): ApiJson,
) -> Result<Response, ApiError> {
    require_loopback(extensions.get::<Peer>().map(|peer| peer.addr))?;
    require_local_host(&headers)?;
    let Some(secret) = &state.dev_jwt_secret else {
        return Err(ApiError::NotFound("no such endpoint".to_owned()));
    };
    let user = body
        .get("user_id")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::BadRequest("user_id is required and must be a string".to_owned()))?;
    let user_id = UserId::parse(user)?;
    let org_ids = requested_orgs(&body)?;
    let orgs: Vec<String> = org_ids.iter().map(|org| org.as_str().to_owned()).collect();
    if let MembershipMode::Database = &state.config.membership {
        for org in &org_ids {
            state
                .store
                .put_member(org.as_str(), user_id.as_str(), "member")
                .await?;
        }
    }
    let token = crate::auth::mint_hs256(secret, user_id.as_str(), &orgs, DEV_TOKEN_TTL)
        .map_err(|err| ApiError::Internal(anyhow::anyhow!("cannot sign a dev token: {err}")))?;
    let expires_at = jsonwebtoken::get_current_timestamp() + DEV_TOKEN_TTL.as_secs();
    tracing::info!(user_id = user_id.as_str(), "dev token minted");
    Ok(Json(json!({
        "token": token,
        "user_id": user_id.as_str(),
        "org_id": org_ids.first().map(OrgId::as_str),
        "org_ids": orgs,
        "expires_at": unix_to_rfc3339(expires_at),
    }))
    .into_response())
}

/// The orgs a `/dev/token` body names: `org_id` (a string; empty or null means none),
/// then each of `org_ids` (an array of strings), without repeats.
fn requested_orgs(body: &Value) -> Result<Vec<OrgId>, ApiError> {
    let mut names: Vec<&str> = Vec::new();
    match body.get("org_id") {
        None | Some(Value::Null) => {}
        Some(Value::String(org)) if org.is_empty() => {}
        Some(Value::String(org)) => names.push(org),
        Some(_) => return Err(ApiError::BadRequest("org_id must be a string".to_owned())),
    }
    match body.get("org_ids") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(org) if !org.is_empty() => names.push(org),
                    _ => {
                        return Err(ApiError::BadRequest(
                            "org_ids must be an array of non-empty strings".to_owned(),
                        ))
                    }
                }
            }
        }
        Some(_) => {
            return Err(ApiError::BadRequest(
                "org_ids must be an array of non-empty strings".to_owned(),
            ))
        }
    }
    let mut orgs: Vec<OrgId> = Vec::new();
    for name in names {
        let org = OrgId::parse(name)?;
        if !orgs.contains(&org) {
            orgs.push(org);
        }
    }
    Ok(orgs)
}

fn object_field(body: &Value, name: &str) -> Result<Option<Map<String, Value>>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map.clone())),
        Some(_) => Err(ApiError::BadRequest(format!("{name} must be a JSON object"))),
    }
}

/// With a user token: publishes a test notification (the body's `notification`, or a
/// default one) to the caller's own `notifications:{user}`.
async fn notify_self(
    State(state): State<AppState>,
    extensions: Extensions,
    headers: HeaderMap,
    User(identity): User,
    ApiJson(body): ApiJson,
) -> Result<Response, ApiError> {
    require_loopback(extensions.get::<Peer>().map(|peer| peer.addr))?;
    require_local_host(&headers)?;
    let channel = Channel::new(ChannelKind::Notifications, identity.user_id.as_str())?;
    let notification = object_field(&body, "notification")?.unwrap_or_else(|| {
        let mut map = Map::new();
        map.insert("title".to_owned(), json!("Test notification"));
        map.insert("body".to_owned(), json!("sent from the demo page"));
        map
    });
    let mut message = Map::new();
    message.insert("type".to_owned(), json!("notification"));
    message.insert("notification".to_owned(), Value::Object(notification));
    let published = state.publish(&channel, &Draft::from_object(message)).await?;
    let receipt = json!({"id": published.id, "channel": channel.name(), "offset": published.offset});
    Ok((StatusCode::ACCEPTED, Json(receipt)).into_response())
}

/// With a user token of a member of `{org_id}`: publishes a test org event
/// (`event_type` default `demo.ping`, optional `data`).
async fn org_event(
    State(state): State<AppState>,
    extensions: Extensions,
    headers: HeaderMap,
    User(identity): User,
    Path(org_id): Path<String>,
    ApiJson(body): ApiJson,
) -> Result<Response, ApiError> {
    require_loopback(extensions.get::<Peer>().map(|peer| peer.addr))?;
    require_local_host(&headers)?;
    let org_id = OrgId::parse(&org_id)?;
    if !state.membership.is_member(org_id.as_str(), &identity).await {
        return Err(ApiError::Forbidden(format!(
            "{} is not a member of {}; mint a token with this org_id first",
            identity.user_id.as_str(),
            org_id.as_str()
        )));
    }
    let channel = Channel::new(ChannelKind::Org, org_id.as_str())?;
    let event_type = match body.get("event_type") {
        None | Some(Value::Null) => "demo.ping".to_owned(),
        Some(Value::String(kind)) if !kind.is_empty() && kind.chars().count() <= 128 => kind.clone(),
        Some(_) => {
            return Err(ApiError::BadRequest(
                "event_type must be a string of 1 to 128 characters".to_owned(),
            ))
        }
    };
    let data = object_field(&body, "data")?.unwrap_or_else(|| {
        let mut map = Map::new();
        map.insert("from".to_owned(), json!(identity.user_id.as_str()));
        map
    });
    let mut message = Map::new();
    message.insert("type".to_owned(), json!("org_event"));
    message.insert("org_id".to_owned(), json!(org_id.as_str()));
    message.insert("event_type".to_owned(), json!(event_type));
    message.insert("data".to_owned(), Value::Object(data));
    let published = state.publish(&channel, &Draft::from_object(message)).await?;
    let receipt = json!({"id": published.id, "channel": channel.name(), "offset": published.offset});
    Ok((StatusCode::ACCEPTED, Json(receipt)).into_response())
}

#[cfg(test)]
mod tests;
