//! Identifiers that arrive from outside (`user_id`, `org_id`, `chat_id`), validated once
//! at the boundary so the rest of herald can trust them.
//!
//! The rule: identifiers are strings of 1–128 characters from `[A-Za-z0-9_.:@-]`.

use std::fmt;

/// The longest identifier herald accepts.
pub const MAX_ID_LEN: usize = 128;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {MAX_ID_LEN} characters")]
    TooLong { what: &'static str },
    #[error("{what} contains a character outside [A-Za-z0-9_.:@-]")]
    BadCharacter { what: &'static str },
}

/// Checks the identifier rule; `what` names the field in the error.
pub fn check_id(value: &str, what: &'static str) -> Result<(), InvalidId> {
    if value.is_empty() {
        return Err(InvalidId::Empty { what });
    }
    if value.len() > MAX_ID_LEN {
        return Err(InvalidId::TooLong { what });
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-');
    if !value.bytes().all(allowed) {
        return Err(InvalidId::BadCharacter { what });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` as this kind of identifier.
            pub fn parse(value: &str) -> Result<Self, InvalidId> {
                check_id(value, $what)?;
                Ok(Self(value.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A user, as named by the token's user claim or a path segment.
    UserId,
    "user_id"
);
id_type!(
    /// An organization whose members share the `org:{org_id}` channel.
    OrgId,
    "org_id"
);
id_type!(
    /// A chat: a conversation whose turns are kept and sent to the LLM as context.
    ChatId,
    "chat_id"
);

#[cfg(test)]
mod tests;
