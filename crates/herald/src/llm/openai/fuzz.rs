//! Fuzz target (property test) for the SSE decoder of the OpenAI-compatible client:
//! what an upstream controls. Any body, cut anywhere, must end the stream without a
//! panic; a well-formed stream cut at arbitrary points must decode to its text.
//! `PROPTEST_CASES` sets the number of cases (see `http::fuzz`, which lists every target).

use bytes::Bytes;
use futures_util::StreamExt;
use proptest::prelude::*;
use tokio::time::{Duration, Instant};

use super::{decode, Errors};
use crate::llm::{LlmError, LlmEvent};

/// Decodes `body` delivered in pieces cut at `cuts` (byte offsets, any order).
fn run(body: &[u8], cuts: &[usize]) -> Vec<Result<LlmEvent, crate::llm::LlmErrorKind>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    points.push(0);
    points.push(body.len());
    points.sort_unstable();
    points.dedup();
    let chunks: Vec<Result<Bytes, LlmError>> = points
        .windows(2)
        .map(|w| Ok(Bytes::copy_from_slice(&body[w[0]..w[1]])))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let far = Instant::now() + Duration::from_secs(3600);
        decode(
            futures_util::stream::iter(chunks),
            "m".to_owned(),
            far,
            Duration::from_secs(3600),
            Errors::default(),
        )
        .map(|event| event.map_err(|err| err.kind()))
        .collect()
        .await
    })
}

/// Lines an upstream might send, well-formed or not.
fn sse_line() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>().prop_map(|s| format!("data: {s}\n")),
        ".{0,40}".prop_map(|s| format!("data: {{\"choices\":[{{\"delta\":{{\"content\":{s:?}}}}}]}}\n\n")),
        Just("data: [DONE]\n\n".to_owned()),
        Just("event: error\ndata: {\"error\":{\"message\":\"x\"}}\n\n".to_owned()),
        Just(": keep-alive\n\n".to_owned()),
        Just("\n".to_owned()),
        Just("data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2},\"choices\":[]}\n\n".to_owned()),
        "[a-z]{0,8}: .{0,20}\r?\n".prop_map(|s| s),
    ]
}

proptest! {
    #[test]
    fn any_body_ends_the_stream_without_a_panic(
        body in proptest::collection::vec(any::<u8>(), 0..2048),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let events = run(&body, &cuts);
        // The stream ends with exactly one terminal event: Done or an error.
        let terminal = events.iter().filter(|e| !matches!(e, Ok(LlmEvent::Delta(_)))).count();
        prop_assert_eq!(terminal, 1, "{:?}", events);
        prop_assert!(!matches!(events.last(), Some(Ok(LlmEvent::Delta(_)))));
    }

    #[test]
    fn upstream_like_lines_end_the_stream_without_a_panic(
        lines in proptest::collection::vec(sse_line(), 0..24),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let body = lines.concat();
        let events = run(body.as_bytes(), &cuts);
        let terminal = events.iter().filter(|e| !matches!(e, Ok(LlmEvent::Delta(_)))).count();
        prop_assert_eq!(terminal, 1, "{:?}", events);
    }

    #[test]
    fn a_well_formed_stream_decodes_to_its_text_wherever_it_is_cut(
        deltas in proptest::collection::vec(any::<String>(), 0..16),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
        crlf in any::<bool>(),
    ) {
        let eol = if crlf { "\r\n" } else { "\n" };
        let mut body = String::new();
        for delta in &deltas {
            let chunk = serde_json::json!({"choices": [{"index": 0, "delta": {"content": delta}}]});
            body.push_str(&format!("data: {chunk}{eol}{eol}"));
        }
        body.push_str(&format!("data: [DONE]{eol}{eol}"));
        let events = run(body.as_bytes(), &cuts);
        let mut text = String::new();
        for event in &events[..events.len().saturating_sub(1)] {
            match event {
                Ok(LlmEvent::Delta(delta)) => text.push_str(delta),
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
        prop_assert!(matches!(events.last(), Some(Ok(LlmEvent::Done { .. }))), "{:?}", events.last());
        prop_assert_eq!(text, deltas.concat());
    }
}
