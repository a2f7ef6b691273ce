//! Issue 19: what an idle, authenticated socket holds on the server's heap. Heap bytes
//! are counted exactly by a wrapping allocator while plain blocking sockets (which
//! allocate nothing) are opened and left idle, so the figure is herald's alone: the
//! session's task, its outbox and channel state, the I/O registration, and no read
//! buffer (vendor/tokio-websockets/PATCHES.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::alloc::System;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use cap::Cap;
use herald::config::{self, Secret};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

const SOCKETS: usize = 200;
const SECRET: &str = "idle-memory-test-secret-0123456789abcdef";

/// Heap bytes an idle socket may hold. The read buffer the WebSocket layer used to
/// keep for each socket was 8 KiB on its own; an idle socket held 3,991 B before the
/// session stopped holding itself twice and its rate limiters became lazy, 3,421 B
/// after, 3,167 B once a batch that needs no waiting was forwarded without a future
/// (issue 19). 3,030 B before and 3,205 B after the shutdown wait got a flag and a
/// waker of its own, so it polls the token only once it woke (`sync::cancelled`: the
/// 48-byte `Arc` and a larger session future, which tokio keeps in a 128-byte-aligned
/// cell).
const MAX_BYTES_PER_SOCKET: usize = 3_600;

/// Opens a WebSocket on `/ws/notifications/` with blocking I/O and reads until the
/// welcome message has arrived, so the session is subscribed and idle.
fn open_idle_socket(addr: SocketAddr, token: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        stream,
        "GET /ws/notifications/ HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    // The welcome is a JSON text frame naming the channel; wait until it is in.
    while !String::from_utf8_lossy(&seen).contains("\"connection_id\"") {
        let n = stream.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the server closed the socket: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    stream
}

#[test]
fn an_idle_socket_holds_a_few_kilobytes_and_no_read_buffer() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let env = BTreeMap::from([
        ("HERALD_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("HERALD_JWT_SECRET".to_owned(), SECRET.to_owned()),
        ("HERALD_API_KEYS".to_owned(), "hk_idle_memory_test_key".to_owned()),
        ("HERALD_DATABASE_URL".to_owned(), "sqlite::memory:".to_owned()),
        ("HERALD_SHUTDOWN_DRAIN".to_owned(), "1".to_owned()),
        ("HERALD_MAX_PENDING_PER_IP".to_owned(), "100000".to_owned()),
    ]);
    let mut config = config::load(None, &env).unwrap();
    config.handshakes_per_ip_per_second = 0;
    let (secrets, _) = herald::dev::resolve(&config).unwrap();
    let shutdown = CancellationToken::new();
    let (addr, server) = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(herald::serve(config, secrets, listener, shutdown.clone()));
        (addr, server)
    });
    let secret = Secret::new(SECRET.to_owned());
    let tokens: Vec<String> = (0..SOCKETS)
        .map(|i| herald::auth::mint_hs256(&secret, &format!("u{i}"), &[], Duration::from_secs(3600)).unwrap())
        .collect();
    // Warm up: the first sockets create the server's lazily built state (metrics,
    // maps, the timer wheel's levels).
    let warm: Vec<TcpStream> = tokens
        .iter()
        .take(20)
        .map(|t| open_idle_socket(addr, t))
        .collect();

    std::thread::sleep(Duration::from_millis(200));
    let before = ALLOCATOR.allocated();
    let sockets: Vec<TcpStream> = tokens
        .iter()
        .skip(20)
        .map(|t| open_idle_socket(addr, t))
        .collect();
    // Let the handshakes' transient buffers go.
    std::thread::sleep(Duration::from_millis(500));
    let held = ALLOCATOR.allocated().saturating_sub(before);
    let per_socket = held / sockets.len();
    println!(
        "idle sockets={} heap held={held} per socket={per_socket}",
        sockets.len()
    );
    assert!(
        per_socket <= MAX_BYTES_PER_SOCKET,
        "an idle socket holds {per_socket} heap bytes, more than {MAX_BYTES_PER_SOCKET}"
    );

    drop(sockets);
    drop(warm);
    shutdown.cancel();
    runtime.block_on(server).unwrap().unwrap();
}
