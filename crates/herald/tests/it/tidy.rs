//! Tidy checks: the docs and the code agree, and the code keeps a few house rules.
//!
//! `docs/protocol.md` is the user-facing contract; its close-code, client-message and
//! configuration tables are compared with `CloseCode::ALL`, `CLIENT_MESSAGE_TYPES` and
//! `config::SETTINGS`, so a change on one side without the other fails here with a
//! message saying what to update. `layers` checks that imports only point down.

mod layers;

use std::path::{Path, PathBuf};

use herald::close::CloseCode;
use herald::config::SETTINGS;
use herald::ws::protocol::CLIENT_MESSAGE_TYPES;

/// The `HERALD_WORKERS` default depends on the command, so `SETTINGS` leaves it empty
/// and the doc spells it out.
const WORKERS_DEFAULT_IN_DOC: &str = "64 (serve), 256 (worker)";

/// The rows of the client-message table that are not message types.
const CLIENT_TABLE_EXTRA_ROWS: [&str; 2] = ["not JSON", "any other JSON"];

/// Files outside the HTTP/WebSocket boundary that may still name axum: the crate root,
/// which assembles the router and serves it.
const AXUM_ALLOWED: [&str; 3] = ["lib.rs", "http.rs", "ws.rs"];
const AXUM_ALLOWED_DIRS: [&str; 2] = ["http", "ws"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("cannot list {}: {err}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().is_some_and(|name| name == "target") {
                    continue;
                }
                stack.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn cells(line: &str) -> Vec<String> {
    let line = line.trim();
    let inner = line.strip_prefix('|').unwrap_or(line);
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    inner.split('|').map(|cell| cell.trim().to_owned()).collect()
}

/// The body rows of the one Markdown table in `doc` whose header is `header`.
#[track_caller]
fn table(doc: &str, file: &str, header: &[&str]) -> Vec<Vec<String>> {
    let lines: Vec<&str> = doc.lines().collect();
    let starts: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, line)| line.trim_start().starts_with('|') && cells(line) == header)
        .map(|(idx, _)| idx)
        .collect();
    let header_line = format!("| {} |", header.join(" | "));
    assert_eq!(
        starts.len(),
        1,
        "{file} must have exactly one table with the header `{header_line}` (found {})",
        starts.len()
    );
    lines[starts[0] + 2..]
        .iter()
        .take_while(|line| line.trim_start().starts_with('|'))
        .map(|line| {
            let row = cells(line);
            assert_eq!(
                row.len(),
                header.len(),
                "{file}: the row `{line}` of the `{header_line}` table must have {} cells",
                header.len()
            );
            row
        })
        .collect()
}

fn unquote(cell: &str) -> &str {
    cell.trim_matches('`')
}

#[test]
fn every_source_file_starts_with_a_module_doc() {
    // The benchmark crates (bench/) and the chaos suite (chaos/) follow the same rule.
    let root = repo_root();
    let missing: Vec<String> = ["crates/herald/src", "bench", "chaos"]
        .into_iter()
        .flat_map(|dir| rust_files(&root.join(dir)))
        .filter(|path| !std::fs::read_to_string(path).unwrap().starts_with("//!"))
        .map(|path| path.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "these files under crates/herald/src, bench/ or chaos/ do not start with a `//!` comment saying \
         what the module owns; add one: {missing:?}"
    );
}

#[test]
fn no_ignored_or_should_panic_tests() {
    // Spelled in two pieces so that this file does not match itself.
    let banned = [concat!("#[", "ignore"), concat!("#[", "should_panic")];
    let crates = repo_root().join("crates");
    let mut found = Vec::new();
    for path in rust_files(&crates) {
        let text = std::fs::read_to_string(&path).unwrap();
        for (idx, line) in text.lines().enumerate() {
            if banned.iter().any(|b| line.contains(b)) {
                found.push(format!(
                    "{}:{}",
                    path.strip_prefix(&crates).unwrap().display(),
                    idx + 1
                ));
            }
        }
    }
    assert!(
        found.is_empty(),
        "found ignored or should_panic tests under crates/: {found:?}. Assert on the Err or None \
         instead of should_panic; instead of ignoring a test, assert today's behaviour and add a FIXME"
    );
}

#[test]
fn close_code_table_matches_close_code_all() {
    let doc = read("docs/protocol.md");
    let documented: Vec<String> = table(&doc, "docs/protocol.md", &["code", "when"])
        .into_iter()
        .map(|row| unquote(&row[0]).to_owned())
        .collect();
    let in_code: Vec<String> = CloseCode::ALL.iter().map(|c| c.code().to_string()).collect();
    assert_eq!(
        documented, in_code,
        "the `| code | when |` table in docs/protocol.md must list exactly herald::close::CloseCode::ALL \
         (crates/herald/src/close.rs), in the same order; update whichever side is behind, and the \
         client-action table below it"
    );
}

#[test]
fn configuration_table_matches_settings() {
    let doc = read("docs/protocol.md");
    let rows = table(&doc, "docs/protocol.md", &["variable", "meaning", "default"]);
    let documented: Vec<&str> = rows.iter().map(|row| unquote(&row[0])).collect();
    let in_code: Vec<&str> = SETTINGS.iter().map(|s| s.env).collect();
    assert_eq!(
        documented, in_code,
        "the `| variable | meaning | default |` table in docs/protocol.md must list exactly the \
         names of herald::config::SETTINGS (crates/herald/src/config.rs), in the same order"
    );
    for (row, setting) in rows.iter().zip(SETTINGS) {
        let cell = row[2].as_str();
        let ok = if setting.env == "HERALD_WORKERS" {
            cell == WORKERS_DEFAULT_IN_DOC
        } else if setting.default.is_empty() {
            cell.starts_with('—')
        } else {
            cell == format!("`{}`", setting.default)
        };
        let expected = if setting.env == "HERALD_WORKERS" {
            WORKERS_DEFAULT_IN_DOC.to_owned()
        } else if setting.default.is_empty() {
            "— (an em dash, optionally followed by an explanation)".to_owned()
        } else {
            format!("`{}`", setting.default)
        };
        assert!(
            ok,
            "docs/protocol.md gives {} the default {cell}, but config::SETTINGS says {:?}; the \
             default cell must be {expected}. Update the doc or SETTINGS",
            setting.env, setting.default
        );
    }
}

#[test]
fn every_toml_only_setting_is_documented() {
    let doc = read("docs/protocol.md");
    for key in herald::config::TOML_ONLY_KEYS {
        assert!(
            doc.contains(&format!("`{key}`")),
            "docs/protocol.md does not document the TOML setting `{key}`; add it to the Configuration section"
        );
    }
}

#[test]
fn client_message_table_matches_protocol() {
    let doc = read("docs/protocol.md");
    let documented: Vec<String> = table(&doc, "docs/protocol.md", &["client sends", "server answers"])
        .into_iter()
        .map(|row| {
            let cell = &row[0];
            match cell.find("\"type\":\"") {
                Some(start) => {
                    let rest = &cell[start + "\"type\":\"".len()..];
                    rest[..rest.find('"').unwrap_or(rest.len())].to_owned()
                }
                None => cell.clone(),
            }
        })
        .collect();
    let expected: Vec<String> = CLIENT_MESSAGE_TYPES
        .iter()
        .chain(CLIENT_TABLE_EXTRA_ROWS.iter())
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(
        documented, expected,
        "the `| client sends | server answers |` table in docs/protocol.md must have one row per \
         herald::ws::protocol::CLIENT_MESSAGE_TYPES entry (as `{{\"type\":\"…\"}}`, in order), then \
         the rows `not JSON` and `any other JSON`; update the table or CLIENT_MESSAGE_TYPES \
         (crates/herald/src/ws/protocol.rs)"
    );
}

#[test]
fn readme_shows_how_to_run_and_test() {
    let readme = read("README.md");
    for command in ["cargo run --release -- serve", "cargo test --workspace"] {
        assert!(
            readme.contains(command),
            "README.md must show `{command}`; put it back near the top"
        );
    }
}

#[test]
fn only_the_http_and_websocket_boundary_imports_axum() {
    let src = repo_root().join("crates/herald/src");
    let offenders: Vec<String> = rust_files(&src)
        .into_iter()
        .filter(|path| {
            let relative = path.strip_prefix(&src).unwrap();
            let top = relative
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let allowed = AXUM_ALLOWED.contains(&&*top) || AXUM_ALLOWED_DIRS.contains(&&*top);
            !allowed && {
                let text = std::fs::read_to_string(path).unwrap();
                text.contains("axum::") || text.contains("use axum")
            }
        })
        .map(|path| path.strip_prefix(&src).unwrap().display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "only http, ws and the crate root (router, serve) may use axum (ARCHITECTURE.md, codemap `ws`); these \
         files do: {offenders:?}. Move the axum-specific part into http/ or ws/"
    );
}

#[test]
fn every_django_table_key_is_documented() {
    let doc = read("docs/protocol.md");
    let rows = table(&doc, "docs/protocol.md", &["key", "meaning", "default"]);
    let documented: Vec<&str> = rows.iter().map(|row| unquote(&row[0])).collect();
    assert_eq!(
        documented,
        herald::config::django::KEYS,
        "the `| key | meaning | default |` table of the Django bridge section in docs/protocol.md \
         must list exactly herald::config::django::KEYS (crates/herald/src/config/django.rs), in order"
    );
}

#[test]
fn the_python_client_sends_the_workers_status_texts() {
    use herald::compose::llm::{LlmStatus, THINKING_MESSAGE};
    let file = "clients/python/src/herald_client/_client.py";
    let source = read(file);
    let python_string = |line: &str| {
        let start = line.find('"')? + 1;
        let end = start + line[start..].find('"')?;
        Some(line[start..end].to_owned())
    };
    let thinking = source
        .lines()
        .find(|line| line.starts_with("THINKING_MESSAGE = "))
        .and_then(python_string);
    assert_eq!(
        thinking.as_deref(),
        Some(THINKING_MESSAGE),
        "{file}: THINKING_MESSAGE must be herald's (herald::compose::llm::THINKING_MESSAGE)"
    );
    let start = source
        .find("STATUS_MESSAGES = {")
        .unwrap_or_else(|| panic!("{file} has no STATUS_MESSAGES dict"));
    let body = &source[start..start + source[start..].find('}').unwrap()];
    let mut entries = 0;
    for line in body.lines().skip(1) {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let key = key.trim().trim_matches('"');
        let status = LlmStatus::parse(key)
            .unwrap_or_else(|| panic!("{file}: STATUS_MESSAGES has {key:?}, which is no llm_status status"));
        let text = match value.trim().trim_end_matches(',') {
            "THINKING_MESSAGE" => THINKING_MESSAGE.to_owned(),
            other => python_string(other).unwrap_or_default(),
        };
        assert_eq!(
            text,
            status.message(),
            "{file}: STATUS_MESSAGES[{key:?}] must be the text herald's workers send \
             (herald::compose::llm::LlmStatus::message)"
        );
        entries += 1;
    }
    assert!(
        entries >= 5,
        "{file}: read only {entries} STATUS_MESSAGES entries"
    );
}

#[test]
fn client_message_labels_are_the_parsers() {
    use herald::metrics::CLIENT_MESSAGE_LABELS;
    use herald::ws::protocol::ClientMessage;
    // One text per kind of client message; metrics creates a series for each label at
    // start, so the two lists must be the same set.
    let samples = [
        r#"{"type":"ping"}"#,
        r#"{"type":"heartbeat"}"#,
        r#"{"type":"refresh","token":"t"}"#,
        r#"{"type":"subscribe","channel":"org:o","id":"s1"}"#,
        r#"{"type":"unsubscribe","channel":"org:o","id":"s1"}"#,
        r#"{"type":"read","channel":"org:o","offset":1}"#,
        r#"{"type":"nope"}"#,
        "not json",
    ];
    let mut labels: Vec<&str> = samples
        .iter()
        .map(|text| ClientMessage::parse(text).label())
        .collect();
    let mut expected = CLIENT_MESSAGE_LABELS.to_vec();
    labels.sort_unstable();
    expected.sort_unstable();
    assert_eq!(
        labels, expected,
        "herald::metrics::CLIENT_MESSAGE_LABELS must hold exactly the labels of \
         ws::protocol::ClientMessage; add the new label there (and a sample here)"
    );
}
