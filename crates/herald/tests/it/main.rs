//! The single integration-test binary: one module per feature area, all against a real
//! herald on 127.0.0.1:0.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

// Shared helpers: not every module uses every one of them.
#[allow(dead_code)]
mod support;

mod api;
mod chat;
mod clients;
mod control;
mod cors;
mod delivery;
mod django;
mod faults;
mod handshake;
mod hostile;
mod idempotency;
mod jwks;
mod lifecycle;
mod limits;
mod llm;
mod llm_upstream;
mod members;
mod metrics;
mod migrations;
mod multiplexed;
mod presence;
mod process;
mod read_state;
mod readme;
mod recovery;
mod redis;
mod redis_cluster;
mod sse;
mod startup;
mod tasks_redis;
mod tidy;
