//! The README's quick start, run as written: `tiergate up --sandbox` in a
//! copy of the checkout's `conf/` (what a fresh clone has), its start-up
//! table, then every command of the README block marked
//! `<!-- quick-start: ... -->` in one bash session, each output compared
//! with the README's (`...` matches anything within a line).
//!
//! The services bind their standard ports (8000, 8021–8025, 8029, 8090),
//! so this test shares the `fixed-ports` group with the other `tiergate
//! up` test (`.config/nextest.toml`).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use crate::platform::TempDir;

/// One `$ command` of the block and the lines it must print.
#[derive(Debug, Clone, PartialEq)]
struct Step {
    command: String,
    expected: Vec<String>,
}

/// The steps of the README's quick-start block.
fn steps(readme: &str) -> Vec<Step> {
    let marker = "<!-- quick-start:";
    let start = readme
        .find(marker)
        .expect("the README marks its quick start");
    let block = &readme[start..];
    let open = block
        .find("```console\n")
        .expect("a console block follows the marker");
    let body = &block[open + "```console\n".len()..];
    let body = &body[..body.find("\n```").expect("the block ends")];
    let mut steps: Vec<Step> = Vec::new();
    for line in body.lines() {
        match line.strip_prefix("$ ") {
            Some(cmd) => steps.push(Step {
                command: cmd.to_owned(),
                expected: Vec::new(),
            }),
            None => steps
                .last_mut()
                .expect("the block starts with a command")
                .expected
                .push(line.to_owned()),
        }
    }
    steps
}

/// Whether `line` matches `pattern`, where `...` stands for any text.
fn matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split("...").collect();
    if parts.len() == 1 {
        return pattern == line;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !line.starts_with(first) || !line[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &line[first.len()..line.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

#[test]
fn test_wildcards_match_within_a_line() {
    for (pattern, line, want) in [
        ("FREE", "FREE", true),
        ("FREE", "FREE ", false),
        ("INV-...-000001-1", "INV-2026-12-000001-1", true),
        ("INV-...-000001-1", "INV-2026-12-000002-1", false),
        ("File: data/mail/....eml", "File: data/mail/01a2.eml", true),
        ("a...b...c", "a-x-b-y-c", true),
        ("a...b...c", "a-x-c-y-b", false),
        ("ab...ba", "aba", false),
    ] {
        assert_eq!(matches(pattern, line), want, "{pattern} ~ {line}");
    }
}

/// A bash session whose stdout (and stderr) arrive line by line.
struct Shell {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

const END: &str = "__quick_start_step_done__";

impl Shell {
    fn start(dir: &Path, path: &str) -> Self {
        let mut child = Command::new("bash")
            .args(["--noprofile", "--norc"])
            .current_dir(dir)
            .env("PATH", path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "exec 2>&1").unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// Runs `command`; what it printed, and its exit status.
    fn run(&mut self, command: &str) -> (Vec<String>, i32) {
        // The marker starts a line of its own; an output that ended with a
        // newline then shows one empty line more, dropped below.
        writeln!(
            self.stdin,
            "{command}\n__rc=$?; printf '\\n{END} %s\\n' \"$__rc\""
        )
        .unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("`{command}` did not finish; it printed {out:?}"));
            if let Some(rc) = line.strip_prefix(&format!("{END} ")) {
                if out.last().is_some_and(String::is_empty) {
                    out.pop();
                }
                return (out, rc.trim().parse().unwrap_or(-1));
            }
            out.push(line);
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tiergate up --sandbox`, stopped with Ctrl-C when dropped.
struct Up {
    child: Child,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The README's loop, against `tiergate up --sandbox` started as a
/// newcomer would: the start-up table lists every service healthy, then
/// each command of the block prints what the README says. A step whose
/// output differs is run again for up to 10 s (the services settle
/// within a second of a payment, as for a person typing), then fails
/// with both outputs.
#[test]
fn test_the_readme_quick_start_runs_as_written() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let steps = steps(&readme);
    assert!(
        (10..15).contains(&steps.len()),
        "the quick start has {} commands",
        steps.len()
    );
    let dir = TempDir::new("quick-start");
    copy_dir(&Path::new(root).join("conf"), &dir.path().join("conf"));
    let bin = Path::new(env!("CARGO_BIN_EXE_tiergate"));
    let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
    let mut child = Command::new(bin)
        .args(["up", "--sandbox"])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .env_remove("TIERGATE_REDIS_URL")
        .env_remove("TIERGATE_SMTP_URL")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let up = Up { child };
    // The table: one row per service, then where mails go.
    let (tx, table) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut rows = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = table.recv_timeout(left).unwrap_or_else(|_| {
            let log = std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default();
            panic!("no start-up table; got {rows:?}; log:\n{log}")
        });
        if line.starts_with('{') {
            continue; // an access-log line
        }
        let done = line.trim_start().starts_with("mail:");
        rows.push(line);
        if done {
            break;
        }
    }
    let text = rows.join("\n");
    for (service, url) in [
        ("users", "http://127.0.0.1:8021"),
        ("subscriptions", "http://127.0.0.1:8022"),
        ("payments", "http://127.0.0.1:8023"),
        ("notifications", "http://127.0.0.1:8024"),
        ("billing", "http://127.0.0.1:8025"),
        ("midtrans sandbox", "http://127.0.0.1:8029"),
        ("gateway", "http://localhost:8000"),
    ] {
        let row = rows
            .iter()
            .find(|r| r.trim_start().starts_with(&format!("{service} ")))
            .unwrap_or_else(|| panic!("no row for {service} in\n{text}"));
        assert!(row.contains(url), "{row}");
        assert!(row.contains(" ok"), "{service} is not healthy:\n{text}");
    }
    assert!(
        text.contains("midtrans: sandbox (http://127.0.0.1:8029)"),
        "{text}"
    );
    assert!(text.contains("mail: files in data/mail"), "{text}");

    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut shell = Shell::start(dir.path(), &path);
    for step in &steps {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut first = None;
        loop {
            let (out, rc) = shell.run(&step.command);
            let first = first.get_or_insert_with(|| out.join("\n"));
            let same = out.len() == step.expected.len()
                && step.expected.iter().zip(&out).all(|(p, l)| matches(p, l));
            if same && rc == 0 {
                if first != &out.join("\n") {
                    eprintln!(
                        "`{}` printed what the README says on a later run",
                        step.command
                    );
                }
                break;
            }
            if Instant::now() >= deadline {
                panic!(
                    "`{}` (exit {rc}) printed\n{}\n(first run: {first:?})\nwhere the README says\n{}",
                    step.command,
                    out.join("\n"),
                    step.expected.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    drop(shell);
    drop(up);
}
