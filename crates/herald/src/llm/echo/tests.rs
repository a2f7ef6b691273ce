//! Unit tests for the `echo` provider: the reply, its deltas and its usage.

use super::*;
use crate::llm::ChatMessage;

#[track_caller]
fn check_tokens(text: &str, expected: &[&str]) {
    let tokens = tokens(text);
    assert_eq!(tokens, expected, "text {text:?}");
    assert_eq!(tokens.concat(), text, "deltas must join to the text");
}

#[test]
fn deltas_are_words_with_the_space_before_them() {
    check_tokens("Echo: hello world", &["Echo:", " hello", " world"]);
    check_tokens("a  b\n c", &["a", "  b", "\n c"]);
    check_tokens("  lead", &["  lead"]);
    check_tokens("trail ", &["trail", " "]);
    check_tokens("wörld 🌍!", &["wörld", " 🌍!"]);
    check_tokens("", &[]);
}

fn request(messages: Vec<ChatMessage>) -> LlmRequest {
    LlmRequest {
        model: "m".to_owned(),
        messages,
    }
}

#[test]
fn the_reply_echoes_the_last_user_message() {
    let chat = request(vec![
        ChatMessage::system("be brief"),
        ChatMessage::user("first"),
        ChatMessage::assistant("Echo: first"),
        ChatMessage::user("  second question \n"),
    ]);
    assert_eq!(reply(&chat), "Echo: second question");
    assert_eq!(
        usage(&chat, 3),
        Usage {
            prompt_tokens: 7,
            completion_tokens: 3
        }
    );
    assert_eq!(
        reply(&request(vec![ChatMessage::system("only system")])),
        "Echo: (empty prompt)"
    );
    assert_eq!(
        reply(&request(vec![ChatMessage::user("   ")])),
        "Echo: (empty prompt)"
    );
}
