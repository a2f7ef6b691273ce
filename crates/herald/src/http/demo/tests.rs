//! Unit tests of the dev endpoints' loopback check (every integration test runs on
//! loopback, so the refusal is only reachable here).

use std::net::SocketAddr;

use axum::extract::ConnectInfo;

use super::require_loopback;

fn peer(addr: &str) -> Option<ConnectInfo<SocketAddr>> {
    Some(ConnectInfo(addr.parse().unwrap()))
}

#[test]
fn only_loopback_peers_may_use_dev_endpoints() {
    assert!(require_loopback(peer("127.0.0.1:5000")).is_ok());
    assert!(require_loopback(peer("127.8.9.10:5000")).is_ok());
    assert!(require_loopback(peer("[::1]:5000")).is_ok());
    for outside in [
        "10.0.0.7:5000",
        "192.168.1.2:80",
        "[2001:db8::1]:443",
        "0.0.0.0:1",
    ] {
        let err = require_loopback(peer(outside)).unwrap_err();
        assert!(err.to_string().contains("herald token"), "{outside}: {err}");
    }
    assert!(require_loopback(None).is_err(), "an unknown peer is refused");
}
