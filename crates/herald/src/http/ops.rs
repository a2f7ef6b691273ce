//! Operations endpoints: `/healthz`, `/readyz`, `/api/v1/stats`, and the page at `/`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::app::AppState;
use crate::http::extract::ServiceKey;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/stats", get(stats))
}

/// The process is alive.
async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// The broker and database answer and the node is not shutting down.
async fn readyz(State(state): State<AppState>) -> Response {
    let broker = state.broker.ready().await;
    let database = state.store.ping().await;
    let shutting_down = state.shutdown.is_cancelled();
    let ready = broker && database && !shutting_down;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "broker": broker,
        "database": database,
        "shutting_down": shutting_down,
    });
    (status, Json(body)).into_response()
}

async fn stats(State(state): State<AppState>, _key: ServiceKey) -> Response {
    Json(json!({"nodes": [state.stats.snapshot(&state)]})).into_response()
}

async fn index(State(state): State<AppState>) -> Response {
    let provider = if state.config.llm_base_url.is_some() {
        "openai-compatible"
    } else {
        "echo"
    };
    Html(format!(
        "<!doctype html><meta charset=utf-8><title>herald</title>\
         <h1>herald is running</h1>\
         <p>WebSocket endpoints: <code>/ws/notifications/</code>, <code>/ws/events/{{org_id}}/</code>, \
         <code>/ws/frame-stream/{{user_id}}/</code>. LLM provider: <b>{provider}</b>.</p>\
         <p>See the README for a worked example.</p>"
    ))
    .into_response()
}
