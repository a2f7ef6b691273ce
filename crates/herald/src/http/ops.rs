//! Operations endpoints: `/healthz`, `/readyz`, `/metrics` and `/api/v1/stats`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::app::AppState;
use crate::http::extract::ServiceKey;
use crate::metrics::Endpoint;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/stats", get(stats))
        .route("/metrics", get(metrics))
}

/// Prometheus scrape endpoint (OpenMetrics text).
async fn metrics(State(state): State<AppState>) -> Response {
    if let Some(memory) = state.broker.memory_stats() {
        state.metrics.sync_history_evictions(memory.history_evictions);
    }
    state.metrics.sync_broker_reconnects(state.broker.reconnects());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// The process is alive.
async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// The broker, database and task queue answer and the node is not shutting down.
async fn readyz(State(state): State<AppState>) -> Response {
    let broker = state.broker.ready().await;
    let database = state.store.ping().await;
    let shutting_down = state.shutdown.is_cancelled();
    // The connection counts share the broker's Redis; a node that cannot count refuses
    // sockets, so it is reported as the broker being down.
    let broker = broker && state.connection_limits.ready();
    let queue = state.tasks.ready();
    let ready = broker && database && queue && !shutting_down;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "broker": broker,
        "database": database,
        "queue": queue,
        "shutting_down": shutting_down,
    });
    (status, Json(body)).into_response()
}

async fn stats(State(state): State<AppState>, _key: ServiceKey) -> Response {
    let metrics = &state.metrics;
    let open = |endpoint: Endpoint| metrics.open_connections(endpoint);
    let node = json!({
        "node_id": &*state.node_id,
        "connections": {
            "open": Endpoint::ALL.iter().map(|e| open(*e)).sum::<i64>(),
            "notifications": open(Endpoint::Notifications),
            "events": open(Endpoint::Events),
            "frame_stream": open(Endpoint::FrameStream),
            "auth_failures_total": metrics.auth_failures_total(),
        },
        "messages": {
            "published": metrics.published_total(),
            "delivered": metrics.delivered_total(),
            "slow_consumer_disconnects": metrics.slow_consumers_total(),
        },
        "subscriptions": state.hub.subscription_count(),
        "history": state.broker.memory_stats().map(|m| json!({
            "channels": m.channels,
            "bytes": m.history_bytes,
            "max_bytes": m.history_max_bytes,
            "evicted_histories": m.history_evictions,
            "evicted_idle_channels": m.idle_evictions,
        })),
    });
    Json(json!({"nodes": [node]})).into_response()
}
