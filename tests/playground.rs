//! The playground page at `/` in a real headless Chromium (Debian's
//! `chromium`, which .ci/run installs), driven over the DevTools protocol by
//! tests/python/playground.py: a prompt in `short` mode, the answer and the
//! counts the page shows checked against the API's reply to the same seeded
//! request, a screenshot saved to target/test-artifacts/playground.png.
//! Without Chromium the test says so and passes, unless
//! TERSE_REQUIRE_CHROMIUM=1 (as in CI) makes that a failure.

mod common;

use common::*;

#[tokio::test]
async fn the_playground_answers_in_a_real_browser_with_the_apis_counts() {
    let found = ["chromium", "chromium-browser"].iter().any(|b| std::process::Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()));
    if !found {
        assert!(std::env::var("TERSE_REQUIRE_CHROMIUM").is_err(), "chromium is missing (apt-get install chromium)");
        eprintln!("chromium not installed: check skipped (TERSE_REQUIRE_CHROMIUM=1 makes this a failure)");
        return;
    }
    let page = get(&shared().url("/")).await;
    let policy = page.headers.get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(policy.contains("default-src 'none'") && policy.contains("connect-src 'self'"), "{policy}");
    let url = shared().url("");
    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts/playground.png");
    let shot_arg = shot.to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || run_python("playground.py", &[&url, &shot_arg])).await.unwrap();
    assert!(std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000), "the screenshot {} is missing", shot.display());
}
