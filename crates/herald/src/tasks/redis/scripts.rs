//! The queue's Lua scripts (`tasks/redis/lua/*.lua`): every change of a task's state is
//! one of them, so a task is never half-submitted or half-ended.

use fred::types::scripts::Script;

/// Where `note_ended.lua` goes in `end.lua` and `cancel.lua`.
const NOTE_ENDED_MARK: &str = "--[[note_ended]]\n";

/// The scripts, loaded once per queue.
pub(super) struct Scripts {
    pub(super) submit: Script,
    pub(super) start: Script,
    pub(super) heartbeat: Script,
    pub(super) checkpoint: Script,
    pub(super) rewrite: Script,
    pub(super) end: Script,
    pub(super) announced: Script,
    pub(super) hand_back: Script,
    pub(super) cancel: Script,
}

impl Scripts {
    pub(super) fn load() -> Self {
        Self {
            submit: Script::from_lua(include_str!("lua/submit.lua")),
            start: Script::from_lua(include_str!("lua/start.lua")),
            heartbeat: Script::from_lua(include_str!("lua/heartbeat.lua")),
            checkpoint: Script::from_lua(include_str!("lua/checkpoint.lua")),
            rewrite: Script::from_lua(include_str!("lua/rewrite.lua")),
            end: Script::from_lua(
                include_str!("lua/end.lua").replace(NOTE_ENDED_MARK, &note_ended_lua(5, 8, 9, 10, 6)),
            ),
            announced: Script::from_lua(include_str!("lua/announced.lua")),
            hand_back: Script::from_lua(include_str!("lua/hand_back.lua")),
            cancel: Script::from_lua(
                include_str!("lua/cancel.lua").replace(NOTE_ENDED_MARK, &note_ended_lua(4, 3, 4, 5, 2)),
            ),
        }
    }
}

/// `note_ended.lua` with its KEYS/ARGV positions filled in.
fn note_ended_lua(e: usize, id: usize, max: usize, prefix: usize, ttl: usize) -> String {
    include_str!("lua/note_ended.lua")
        .replace("KEYS[E]", &format!("KEYS[{e}]"))
        .replace("ARGV[ID]", &format!("ARGV[{id}]"))
        .replace("ARGV[MAX]", &format!("ARGV[{max}]"))
        .replace("ARGV[PREFIX]", &format!("ARGV[{prefix}]"))
        .replace("ARGV[TTL]", &format!("ARGV[{ttl}]"))
}
