//! Unit tests for `tasks::worker`: reading a stream back ([`Resume::observe`]) and
//! comparing a retried answer with the text already sent ([`Replay`]).

use serde_json::json;

use super::*;
use crate::compose::llm::THINKING_MESSAGE;

fn frame(index: u64, delta: &str) -> Value {
    json!({"type": "llm_frame", "frame": {"status": "streaming", "delta": delta, "index": index}})
}

fn status(status: &str) -> Value {
    json!({"type": "llm_status", "status": status})
}

#[test]
fn observe_follows_the_stream_and_a_restart_starts_the_text_again() {
    let mut resume = Resume {
        phase: Phase::Streaming,
        text: "Hel".to_owned(),
        next_index: 1,
        ended: None,
    };
    // A frame already counted and one from the future change nothing.
    resume.observe(&frame(0, "Hel"));
    resume.observe(&frame(2, "!"));
    resume.observe(&frame(1, "lo"));
    assert_eq!((resume.text.as_str(), resume.next_index), ("Hello", 2));

    resume.observe(&status("restarted"));
    assert_eq!((resume.text.as_str(), resume.next_index), ("", 0));
    assert_eq!(resume.phase, Phase::Streaming);
    resume.observe(&frame(0, "Hi"));
    resume.observe(&frame(1, " there"));
    assert_eq!((resume.text.as_str(), resume.next_index), ("Hi there", 2));

    resume.observe(&json!({"type": "llm_response", "data": {}}));
    assert_eq!(resume.phase, Phase::Responded);
    resume.observe(&status("completed"));
    assert_eq!(resume.phase, Phase::Completed);
    assert_eq!(resume.ended, None);
}

#[test]
fn observe_notices_a_stream_that_already_told_the_user_it_failed_or_was_cancelled() {
    let failed = |announced| Ended {
        status: TaskStatus::Failed,
        error: Some("LLM processing failed: upstream said no".to_owned()),
        announced,
    };
    let mut resume = Resume::default();
    resume.observe(&frame(0, "Hel"));
    resume.observe(&json!({"type": "llm_error", "error": "LLM processing failed: upstream said no"}));
    assert_eq!(resume.ended, Some(failed(false)));
    resume.observe(&status("failed"));
    assert_eq!(resume.ended, Some(failed(true)));

    // A failed status whose `llm_error` was lost still ends the task, with a general error.
    let mut resume = Resume::default();
    resume.observe(&status("failed"));
    let expected = Ended {
        status: TaskStatus::Failed,
        error: Some(FAILED.to_owned()),
        announced: true,
    };
    assert_eq!(resume.ended, Some(expected));

    let mut resume = Resume::default();
    resume.observe(&status("started"));
    resume.observe(&status("cancelled"));
    let expected = Ended {
        status: TaskStatus::Cancelled,
        error: None,
        announced: true,
    };
    assert_eq!(resume.ended, Some(expected));
}

#[test]
fn replay_drops_what_was_sent_however_the_new_answer_is_cut() {
    let mut replay = Replay {
        sent: "Echo: a b".to_owned(),
        matched: 0,
    };
    assert_eq!(replay.fresh("Ec"), Ok(""));
    assert_eq!(replay.fresh("ho: a"), Ok(""));
    assert!(!replay.complete());
    assert_eq!(replay.fresh(" b c"), Ok(" c"));
    assert!(replay.complete());
    assert_eq!(replay.fresh(" d"), Ok(" d"));
}

#[test]
fn a_different_answer_is_noticed_and_restarts_from_its_own_beginning() {
    let mut replay = Replay {
        sent: "Hello wörld".to_owned(),
        matched: 0,
    };
    assert_eq!(replay.fresh("Hello "), Ok(""));
    assert_eq!(replay.fresh("there"), Err(()));
    // The new answer so far: what matched, and the delta that differed.
    assert_eq!(replay.restart("there"), "Hello there");
    assert!(replay.complete());
    assert_eq!(replay.fresh("wörld"), Ok("wörld"));

    // A new answer that stops short of the text sent restarts too.
    let mut short = Replay {
        sent: "Hello world".to_owned(),
        matched: 0,
    };
    assert_eq!(short.fresh("Hello"), Ok(""));
    assert!(!short.complete());
    assert_eq!(short.restart(""), "Hello");
}

#[test]
fn progress_names_the_bytes_appended_since_the_last_save() {
    let progress = Progress {
        phase: Phase::Streaming,
        text: "Hello wörld",
        appended: " wörld".len(),
        next_index: 2,
        offset: 7,
        restarted: false,
    };
    assert_eq!(progress.delta(), " wörld");
    assert_eq!(
        Progress {
            appended: 0,
            ..progress
        }
        .delta(),
        ""
    );
}

#[test]
fn every_message_from_the_template_is_the_message_the_json_path_makes() {
    let request = TaskRequest {
        user_id: crate::ids::UserId::parse("u-1").unwrap(),
        chat_id: crate::ids::ChatId::parse("chat_9").unwrap(),
        prompt: String::new(),
        model: String::new(),
    };
    let task_id = "t0f3";
    let template = MessageTemplate::new(&request, task_id);
    let odd = " \"quoted\" \\ back\nslash\t\u{1} wörld 😀</script>";
    let data = json!({"response": odd, "event": "response_generated", "usage": {"b": 1, "a": [2, null]}});
    let mut messages = vec![
        LlmMessage::Frame {
            delta: "Echo:",
            index: 0,
        },
        LlmMessage::Frame {
            delta: odd,
            index: 41,
        },
        LlmMessage::Frame {
            delta: "",
            index: u64::MAX,
        },
        LlmMessage::Thinking {
            message: THINKING_MESSAGE,
        },
        LlmMessage::Thinking { message: odd },
        LlmMessage::Status {
            status: LlmStatus::Failed,
            message: odd,
        },
        LlmMessage::Response { data },
        LlmMessage::Error { error: odd },
        LlmMessage::Error { error: "" },
    ];
    messages.extend(LlmStatus::ALL.map(LlmMessage::status));
    for message in messages {
        let made = template.draft(&message).unwrap();
        let expected = message_via_map(&request, task_id, message.clone());
        assert_eq!(
            String::from_utf8_lossy(made.as_bytes()),
            String::from_utf8_lossy(expected.as_bytes()),
            "{message:?}"
        );
    }
}
