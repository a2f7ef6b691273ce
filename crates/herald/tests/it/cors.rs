//! CORS: the browser-facing calls (the user API `/api/chat/*` and the client at
//! `/client/*`) answer preflights and name the allowed origin for the origins of
//! `HERALD_ALLOWED_ORIGINS`, and only those; the service API answers no CORS at all.
//! Also the small routes a browser asks for on its own: `/favicon.ico`, and the demo
//! page that `HERALD_DEMO_PAGE=false` turns off. (A real cross-origin page in Chromium
//! is step 6 of `clients/js/test/browser.mjs`.)

use serde_json::json;

use crate::support::*;

const APP: &str = "https://app.example.com";
const OTHER: &str = "https://evil.example.com";

async fn server() -> TestServer {
    TestServer::builder()
        .env("HERALD_ALLOWED_ORIGINS", APP)
        .spawn()
        .await
}

/// A preflight for `method path` from `origin`, asking for the headers a user-API call
/// sends.
async fn preflight(srv: &TestServer, path: &str, origin: &str, method: &str) -> reqwest::Response {
    srv.http
        .request(reqwest::Method::OPTIONS, srv.url(path))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", method)
        .header("Access-Control-Request-Headers", "authorization,content-type")
        .send()
        .await
        .unwrap()
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn the_user_api_answers_preflights_from_allowed_origins() {
    let srv = server().await;
    for (path, method) in [
        ("/api/chat/generate-response/", "POST"),
        ("/api/chat/tasks/t1", "GET"),
        ("/api/chat/tasks/t1/cancel", "POST"),
        ("/api/chat/chat-1/messages", "GET"),
    ] {
        let response = preflight(&srv, path, APP, method).await;
        assert!(response.status().is_success(), "{path}: {}", response.status());
        assert_eq!(
            header(&response, "access-control-allow-origin"),
            Some(APP),
            "{path}"
        );
        let methods = header(&response, "access-control-allow-methods").unwrap_or_default();
        assert!(methods.contains(method), "{path}: {methods}");
        let headers = header(&response, "access-control-allow-headers")
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(
            headers.contains("authorization") && headers.contains("content-type"),
            "{path}: {headers}"
        );
        assert_eq!(header(&response, "access-control-allow-credentials"), None);

        let refused = preflight(&srv, path, OTHER, method).await;
        assert_eq!(
            header(&refused, "access-control-allow-origin"),
            None,
            "{path}: an origin not in HERALD_ALLOWED_ORIGINS gets no CORS grant"
        );
    }

    // The call itself names the origin too, so the browser hands the answer to the page.
    let response = srv
        .http
        .post(srv.url("/api/chat/generate-response/"))
        .header("Origin", APP)
        .bearer_auth(srv.token("u1"))
        .json(&json!({"user_id": "u1", "chat_id": "c1", "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(header(&response, "access-control-allow-origin"), Some(APP));
    assert!(header(&response, "vary").is_some_and(|v| v.to_ascii_lowercase().contains("origin")));
}

#[tokio::test]
async fn the_client_may_be_imported_from_allowed_origins() {
    let srv = server().await;
    for path in ["/client/herald.js", "/client/herald.d.ts"] {
        let response = srv
            .http
            .get(srv.url(path))
            .header("Origin", APP)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "access-control-allow-origin"),
            Some(APP),
            "{path}"
        );
        let response = srv
            .http
            .get(srv.url(path))
            .header("Origin", OTHER)
            .send()
            .await
            .unwrap();
        assert_eq!(header(&response, "access-control-allow-origin"), None, "{path}");
    }
}

#[tokio::test]
async fn the_service_api_answers_no_cors() {
    let srv = TestServer::builder()
        .env("HERALD_ALLOWED_ORIGINS", "*")
        .spawn()
        .await;
    for path in [
        "/api/v1/notifications/alice",
        "/api/v1/publish",
        "/api/v1/orgs/acme/members/alice",
    ] {
        let response = preflight(&srv, path, APP, "POST").await;
        assert_eq!(
            header(&response, "access-control-allow-origin"),
            None,
            "{path}: the service API is for backends"
        );
    }
    let response = srv
        .http
        .post(srv.url("/api/v1/notifications/alice"))
        .header("Origin", APP)
        .bearer_auth(API_KEY)
        .json(&json!({"title": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(header(&response, "access-control-allow-origin"), None);

    // With `*`, the user API grants any origin.
    let response = preflight(&srv, "/api/chat/generate-response/", OTHER, "POST").await;
    assert_eq!(header(&response, "access-control-allow-origin"), Some(OTHER));
}

#[tokio::test]
async fn favicon_is_no_content_and_the_demo_page_can_be_turned_off() {
    let srv = TestServer::spawn().await;
    let response = srv.http.get(srv.url("/favicon.ico")).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(srv.http.get(srv.url("/")).send().await.unwrap().status(), 200);

    let srv = TestServer::builder()
        .env("HERALD_DEMO_PAGE", "false")
        .spawn()
        .await;
    let (status, body) = srv.get("/").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("HERALD_DEMO_PAGE"),
        "{body}"
    );
    let response = srv.http.get(srv.url("/client/herald.js")).send().await.unwrap();
    assert_eq!(response.status(), 200, "the client is still served");
}
