//! `modpo-trainer serve` on a tiny trained run, driven from outside as its users would: the
//! official `openai` Python client (shapes, streaming, errors, two weightings in one batch
//! equal to each alone), the playground page in headless Chromium (Playwright), a bounded
//! load test on 127.0.0.1, the queue and timeout limits, and a graceful SIGTERM.
//!
//! The scripts live in `tests/serve/`. They need the `openai` package in `.venv`, Debian's
//! `chromium` and `tests/serve/node_modules` (`playwright-core`): `make test` installs all three.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{project_root, Job};

fn succeed(args: &[&str]) {
    let out = support::modpo(args);
    assert!(out.status.success(), "{args:?}: {}", support::stderr(&out));
}

/// Synthetic data with two dimensions, the tiny model, and a short curriculum run on them at a
/// high learning rate (so that different weights give different greedy answers), in `dir/run`.
fn train_tiny_run(dir: &Path) -> PathBuf {
    let s = |p: &str| dir.join(p).to_str().unwrap().to_string();
    succeed(&[
        "synth",
        "--scenario",
        "independent",
        "--out",
        &s("synth"),
        "--pairs",
        "200",
        "--eval-pairs",
        "40",
    ]);
    succeed(&["tiny-model", "--out", &s("model")]);
    let config = "[model]\npath = \"model\"\ndevice = \"cpu\"\n\
         [data]\nformat = \"generic\"\ndimensions = [\"polite\", \"formal\"]\n\
         train_file = \"synth/train.jsonl\"\neval_file = \"synth/eval.jsonl\"\n\
         max_length = 128\nglobal_batch = 8\nmicro_batch = 4\n\
         [method]\nname = \"curriculum\"\n\
         [train]\noutput_dir = \"run\"\nmax_steps = 2\nlearning_rate = 0.05\n";
    std::fs::write(dir.join("run.toml"), config).unwrap();
    succeed(&["train", "--config", &s("run.toml")]);
    dir.join("run")
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.1 request on a fresh connection; returns the whole raw response.
fn http(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// `serve --run RUN ARGS` on a free port, once `/health` answers; returns it with its port.
fn start_server(run: &Path, args: &[&str]) -> (Job, u16) {
    start_serving("--run", run, args)
}

/// `serve SOURCE DIR ARGS` (SOURCE `--run` or `--model`), as [`start_server`].
fn start_serving(source: &str, dir: &Path, args: &[&str]) -> (Job, u16) {
    let port = free_port();
    let port_arg = port.to_string();
    let mut all = vec![
        "serve",
        source,
        dir.to_str().unwrap(),
        "--port",
        &port_arg,
        // One libtorch thread: on a small shared machine the tiny model's many small ops run
        // many times faster without a thread pool to wake.
        "--threads",
        "1",
    ];
    all.extend_from_slice(args);
    let mut server = Job::modpo(&all);
    server.wait_until(
        "the server answers /health",
        Duration::from_millis(50),
        || http(port, "GET", "/health", "").is_ok_and(|r| r.contains("\"status\":\"ok\"")),
    );
    (server, port)
}

/// Runs a script of `tests/serve/` with `program`, asserting it succeeds; returns its stdout.
fn run_script(program: &str, script: &str, args: &[&str]) -> String {
    let dir = project_root().join("tests/serve");
    let out = Command::new(program)
        .arg(dir.join(script))
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} {script}: {e} (`make test` installs it)"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    println!("{script}:\n{stdout}");
    stdout
}

fn python() -> String {
    project_root()
        .join(".venv/bin/python")
        .to_str()
        .unwrap()
        .to_string()
}

/// The playground script's dependencies are where `make test` puts them.
fn check_browser_dependencies() {
    let playwright = project_root().join("tests/serve/node_modules/playwright-core");
    assert!(
        playwright.is_dir(),
        "{} is missing: run `make test` (or `npm ci` in tests/serve)",
        playwright.display()
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: run `make test` (it installs Debian's chromium)"
    );
}

#[test]
fn clients_a_browser_and_a_load_test_are_served_and_sigterm_finishes_what_is_in_flight() {
    check_browser_dependencies();
    let tmp = tempfile::tempdir().unwrap();
    let run = train_tiny_run(tmp.path());
    let (server, port) = start_server(&run, &["--max-batch", "8"]);
    let base = format!("http://127.0.0.1:{port}");
    run_script(&python(), "openai_client.py", &[&base, "run"]);
    run_script("node", "playground.mjs", &[&base]);
    let figures = run_script(
        &python(),
        "load_test.py",
        &[&base, "run", "--clients", "8", "--max-tokens", "32"],
    );
    assert!(figures.contains("all 8 concurrent answers equal their solo answers"));

    // SIGTERM while a long answer streams (2000 tokens, seconds here): the answer still ends
    // whole, then the server exits.
    let body = r#"{"model": "run", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2000, "temperature": 0, "stream": true}"#;
    let streaming = std::thread::spawn(move || http(port, "POST", "/v1/chat/completions", body));
    support::wait_until("the answer streams", Duration::from_millis(10), || {
        http(port, "GET", "/health", "").is_ok_and(|r| r.contains("\"running\":1"))
    });
    server.signal("TERM");
    let answer = streaming.join().unwrap().expect("the stream's connection");
    assert!(
        answer.contains("\"finish_reason\":\"length\"") && answer.contains("data: [DONE]"),
        "the answer in flight did not finish: {answer}"
    );
    let finished = server.finish();
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(http(port, "GET", "/health", "").is_err(), "still listening");
}

#[test]
fn a_full_queue_gets_503_and_a_slow_request_504() {
    let tmp = tempfile::tempdir().unwrap();
    let run = train_tiny_run(tmp.path());
    let (server, port) = start_server(
        &run,
        &[
            "--max-batch",
            "1",
            "--max-queue",
            "1",
            // Far below the 4000-token request of limits.py (about 4 s here).
            "--request-timeout",
            "1",
        ],
    );
    run_script(
        &python(),
        "limits.py",
        &[&format!("http://127.0.0.1:{port}"), "run"],
    );
    server.signal("TERM");
    let finished = server.finish();
    assert!(finished.status.success(), "{}", finished.stderr);
}

#[test]
fn a_model_without_adapters_is_served_and_refuses_preference_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    support::tiny_model(&model, 3);
    let (server, port) = start_serving("--model", &model, &[]);
    let request = |extra: &str| {
        let body = format!(
            r#"{{"model": "model", "messages": [{{"role": "user", "content": "Hi"}}],
                "max_tokens": 4, "temperature": 0{extra}}}"#
        );
        http(port, "POST", "/v1/chat/completions", &body).unwrap()
    };
    let answer = request("");
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("\"completion_tokens\":4"),
        "{answer}"
    );
    let refused = request(r#", "preference_weights": [1.0]"#);
    assert!(
        refused.starts_with("HTTP/1.1 400")
            && refused.contains("\"param\":\"preference_weights\"")
            && refused.contains("without preference adapters"),
        "{refused}"
    );
    server.signal("TERM");
    assert!(server.finish().status.success());
}
