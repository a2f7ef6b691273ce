//! Unit tests for `ids`: the identifier rule.

use super::*;

#[track_caller]
fn check(value: &str, expected: Result<(), InvalidId>) {
    assert_eq!(check_id(value, "user_id"), expected, "input {value:?}");
}

#[test]
fn identifier_rule() {
    check("user_123", Ok(()));
    check("a", Ok(()));
    check("Org.Acme:eu-1@x", Ok(()));
    check(&"x".repeat(128), Ok(()));
    check("", Err(InvalidId::Empty { what: "user_id" }));
    check(&"x".repeat(129), Err(InvalidId::TooLong { what: "user_id" }));
    for bad in ["a b", "a/b", "ä", "a?b", "a#b", "a%20", "<script>", "a\nb"] {
        check(bad, Err(InvalidId::BadCharacter { what: "user_id" }));
    }
}

#[test]
fn newtypes_validate() {
    assert_eq!(UserId::parse("u1").map(|id| id.to_string()), Ok("u1".to_owned()));
    assert!(OrgId::parse("acme corp").is_err());
    assert!(ChatId::parse("").is_err());
}
