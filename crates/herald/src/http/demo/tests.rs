//! Unit tests of the dev endpoints' loopback and `Host` checks (every integration test runs on
//! loopback, so the refusal is only reachable here).

use std::net::SocketAddr;

use axum::http::{HeaderMap, HeaderValue};

use super::{require_local_host, require_loopback};

fn peer(addr: &str) -> Option<SocketAddr> {
    Some(addr.parse().unwrap())
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

fn host(values: &[&str]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for v in values {
        headers.append("host", HeaderValue::from_str(v).unwrap());
    }
    headers
}

#[test]
fn only_local_host_names_may_use_dev_endpoints() {
    for ok in [
        "localhost",
        "localhost:8000",
        "LOCALHOST:1",
        "127.0.0.1:8000",
        "127.0.0.1",
        "[::1]:8000",
        "[::1]",
    ] {
        assert!(require_local_host(&host(&[ok])).is_ok(), "{ok}");
    }
    for bad in [
        "evil.example:8000",
        "localhost.evil.example",
        "127.0.0.1.nip.io:8000",
        "127.0.0.2:8000",
        "[::2]:80",
        "localhost:80x",
        "",
    ] {
        let err = require_local_host(&host(&[bad])).unwrap_err();
        assert!(err.to_string().contains("Host"), "{bad}: {err}");
    }
    assert!(
        require_local_host(&HeaderMap::new()).is_err(),
        "no Host is refused"
    );
    assert!(
        require_local_host(&host(&["localhost", "evil.example"])).is_err(),
        "two Hosts are refused"
    );
}
