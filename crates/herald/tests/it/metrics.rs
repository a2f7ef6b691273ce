//! Issue 5: a scripted session moves each named metric by the expected amount.

use std::collections::HashMap;

use serde_json::json;

use crate::support::*;

/// Parses OpenMetrics text into `series → value` (`name{labels}` as written).
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(srv: &TestServer) -> HashMap<String, f64> {
    let response = srv.http.get(srv.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    parse(&response.text().await.unwrap())
}

#[track_caller]
fn moved(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str, by: f64) {
    let b = before
        .get(series)
        .copied()
        .unwrap_or_else(|| panic!("{series} missing before"));
    let a = after
        .get(series)
        .copied()
        .unwrap_or_else(|| panic!("{series} missing after"));
    assert_eq!(a - b, by, "{series}: {b} -> {a}");
}

#[tokio::test]
async fn scripted_session_moves_every_metric() {
    let srv = TestServer::builder()
        .env("HERALD_CLIENT_MESSAGES_PER_MINUTE", "3")
        .env("HERALD_ALLOWED_ORIGINS", "https://app.example.com")
        .spawn()
        .await;
    let before = scrape(&srv).await;
    // Every family is there from the start.
    for series in [
        "herald_connections_open{endpoint=\"notifications\"}",
        "herald_connections_per_user_count",
        "herald_connection_duration_seconds_count",
        "herald_messages_published_total{kind=\"notifications\"}",
        "herald_messages_delivered_total{kind=\"notifications\"}",
        "herald_publish_to_send_seconds_count",
        "herald_client_messages_total{type=\"ping\"}",
        "herald_auth_failures_total{reason=\"bad_signature\"}",
        "herald_close_codes_total{code=\"4001\"}",
        "herald_slow_consumer_disconnects_total",
        "herald_broker_reconnects_total",
        "herald_task_queue_depth",
        "herald_llm_time_to_first_token_seconds_count",
        "herald_llm_tokens_per_second_count",
        "herald_task_outcomes_total{outcome=\"completed\"}",
    ] {
        assert_eq!(before.get(series), Some(&0.0), "{series} must start at zero");
    }

    // Failures: a bad token, a missing token, a refused origin, a bad API key.
    expect_refused_with(
        WsClient::connect(&srv, "/ws/notifications/").token("bad.token.here"),
        4001,
    )
    .await;
    expect_refused_with(WsClient::connect(&srv, "/ws/notifications/"), 4001).await;
    let refused = WsClient::connect(&srv, "/ws/notifications/")
        .origin("https://evil.example.com")
        .open()
        .await;
    assert!(matches!(refused, Err(Refused(403))));
    let response = srv
        .http
        .post(srv.url("/api/v1/notifications/u1"))
        .bearer_auth("wrong")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);

    // A session: two messages delivered, two client messages, then a rate-limit close.
    let (mut ws, _) = srv.connect("/ws/notifications/", "u1").await;
    let open = scrape(&srv).await;
    assert_eq!(open["herald_connections_open{endpoint=\"notifications\"}"], 1.0);
    srv.notify("u1", json!({"n": 1})).await;
    srv.notify("u1", json!({"n": 2})).await;
    ws.next_json().await;
    ws.next_json().await;
    ws.send_json(json!({"type": "ping"})).await;
    ws.next_json().await;
    ws.send_text("nope").await;
    ws.next_json().await;
    ws.send_json(json!({"type": "heartbeat"})).await;
    ws.next_json().await;
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.expect_close().await.0, 4429);
    drop(ws);
    // Let the session finish its bookkeeping.
    for _ in 0..300 {
        if scrape(&srv).await["herald_connections_open{endpoint=\"notifications\"}"] == 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    // A task with the echo provider.
    let (mut frames, _) = srv.connect("/ws/frame-stream/u9/", "u9").await;
    let task_id = crate::chat::generate(&srv, "u9", "c", "count my tokens").await;
    crate::chat::TaskStream::read(&mut frames, &task_id).await;
    drop(frames);
    for _ in 0..300 {
        let now = scrape(&srv).await;
        if now["herald_task_outcomes_total{outcome=\"completed\"}"] == 1.0
            && now["herald_connections_open{endpoint=\"frame_stream\"}"] == 0.0
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    let after = scrape(&srv).await;
    moved(
        &before,
        &after,
        "herald_task_outcomes_total{outcome=\"completed\"}",
        1.0,
    );
    moved(
        &before,
        &after,
        "herald_task_outcomes_total{outcome=\"failed\"}",
        0.0,
    );
    moved(
        &before,
        &after,
        "herald_llm_time_to_first_token_seconds_count",
        1.0,
    );
    moved(&before, &after, "herald_llm_tokens_per_second_count", 1.0);
    moved(&before, &after, "herald_task_queue_depth", 0.0);
    moved(
        &before,
        &after,
        "herald_messages_published_total{kind=\"frames\"}",
        10.0,
    );
    moved(
        &before,
        &after,
        "herald_auth_failures_total{reason=\"malformed\"}",
        1.0,
    );
    moved(
        &before,
        &after,
        "herald_auth_failures_total{reason=\"missing\"}",
        1.0,
    );
    moved(
        &before,
        &after,
        "herald_auth_failures_total{reason=\"bad_api_key\"}",
        1.0,
    );
    moved(&before, &after, "herald_origin_rejected_total", 1.0);
    moved(&before, &after, "herald_close_codes_total{code=\"4001\"}", 2.0);
    moved(&before, &after, "herald_close_codes_total{code=\"4429\"}", 1.0);
    moved(
        &before,
        &after,
        "herald_rate_limited_total{limit=\"client_messages\"}",
        1.0,
    );
    moved(
        &before,
        &after,
        "herald_messages_published_total{kind=\"notifications\"}",
        2.0,
    );
    moved(
        &before,
        &after,
        "herald_messages_delivered_total{kind=\"notifications\"}",
        2.0,
    );
    moved(
        &before,
        &after,
        "herald_client_messages_total{type=\"ping\"}",
        1.0,
    );
    moved(
        &before,
        &after,
        "herald_client_messages_total{type=\"invalid_json\"}",
        1.0,
    );
    moved(
        &before,
        &after,
        "herald_client_messages_total{type=\"heartbeat\"}",
        1.0,
    );
    moved(&before, &after, "herald_connections_per_user_count", 2.0);
    moved(&before, &after, "herald_connection_duration_seconds_count", 2.0);
    moved(
        &before,
        &after,
        "herald_connections_open{endpoint=\"notifications\"}",
        0.0,
    );
    assert!(after["herald_publish_to_send_seconds_count"] >= 1.0);
    assert!(
        !after.keys().any(|series| series.contains("u1")),
        "no metric label may carry a user id"
    );
}
