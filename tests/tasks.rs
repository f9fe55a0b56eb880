//! Task workers, events, cron jobs and custom processes through the real binary, with the
//! `fixture-tasks` plugin (plugins/fixtures/tasks), whose components log `FIXTURE key=value`
//! lines that these tests read from the server's stderr. Timing checks assert only what noise
//! cannot break: lower bounds set by the scheduler's own guarantees, upper bounds from the
//! fixed-rate schedule, and generous waits.

use std::time::{Duration, Instant};

use crate::common::{job_artifacts, run_plughost, Config, TestServer};

const LOG_WAIT: Duration = Duration::from_secs(10);

/// The fixture on `/t/*` with two HTTP workers and two task workers.
fn base() -> Config {
    Config::empty()
        .workers(2)
        .plugin("tasks", &job_artifacts().fixture)
        .route("/t/*", "tasks.ctl")
        .extra("task_worker_num: 2")
}

/// What a `/t/...` call answered: `ok ID w=WORKER t=MS`.
#[derive(Debug)]
struct Accepted {
    id: u64,
    worker: u32,
    t: u128,
}

fn call(server: &TestServer, path: &str) -> Result<Accepted, String> {
    let resp = server.get(path);
    let text = resp.text();
    let Some(rest) = text.trim().strip_prefix("ok ") else {
        return Err(text.trim().to_owned());
    };
    let mut parts = rest.split_whitespace();
    let id = parts.next().and_then(|v| v.parse().ok()).expect("an id");
    let worker = field(rest, "w").and_then(|v| v.parse().ok()).expect("w=");
    let t = field(rest, "t").and_then(|v| v.parse().ok()).expect("t=");
    Ok(Accepted { id, worker, t })
}

fn ok(server: &TestServer, path: &str) -> Accepted {
    call(server, path).unwrap_or_else(|e| panic!("GET {path} was refused: {e}\n{}", server.logs()))
}

/// The value of `key=value` in a line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|tok| tok.strip_prefix(key)?.strip_prefix('='))
}

/// The fixture's lines that contain every needle, in log order.
fn lines(logs: &str, needles: &[&str]) -> Vec<String> {
    logs.lines()
        .filter(|l| l.contains("FIXTURE ") && needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

fn count(server: &TestServer, needles: &[&str]) -> usize {
    lines(&server.logs(), needles).len()
}

fn wait_lines(server: &TestServer, needles: &[&str], n: usize, timeout: Duration) -> Vec<String> {
    let found = server.wait_for_log_matching(timeout, |t| lines(t, needles).len() >= n);
    assert!(
        found,
        "expected {n} line(s) with {needles:?} within {timeout:?}:\n{}",
        server.logs()
    );
    lines(&server.logs(), needles)
}

fn info(server: &TestServer) -> String {
    let out = run_plughost([
        "info".as_ref(),
        "-c".as_ref(),
        server.config_path().as_os_str(),
    ]);
    assert!(out.status.success(), "info failed: {}", out.stderr);
    out.stdout
}

#[test]
fn a_delayed_task_does_not_run_before_its_delay() {
    let server = base().start();
    let a = ok(&server, "/t/deliver?task=tasks.record&p=late&delay=600");
    let now = ok(&server, "/t/deliver?task=tasks.record&p=now");
    let late = wait_lines(&server, &["task=record", "p=late "], 1, LOG_WAIT);
    let ran: u128 = field(&late[0], "t").unwrap().parse().unwrap();
    assert!(
        ran >= a.t + 600,
        "task with delay 600 ms ran {} ms after it was delivered:\n{}",
        ran - a.t,
        server.logs()
    );
    // The delayed task held no worker: the undelayed one, delivered after it, ran first.
    let first = wait_lines(&server, &["task=record"], 2, LOG_WAIT);
    assert!(first[0].contains("p=now "), "{first:?}");
    assert!(now.id > a.id);
}

#[test]
fn an_always_failing_task_runs_exactly_tries_times() {
    let server = base().start();
    let a = ok(&server, "/t/deliver?task=tasks.fail&p=f3&tries=3");
    server.wait_for_log(
        &format!("task tasks.fail #{} failed after 3 tries", a.id),
        LOG_WAIT,
    );
    // The backoff before a 4th try would be 400 ms: wait past it.
    std::thread::sleep(Duration::from_millis(800));
    let tries = lines(&server.logs(), &["task=fail", "p=f3 "]);
    let attempts: Vec<&str> = tries.iter().filter_map(|l| field(l, "attempt")).collect();
    assert_eq!(attempts, ["1", "2", "3"], "{}", server.logs());
    // Retries back off: 100 ms, then 200 ms.
    let t: Vec<u128> = tries
        .iter()
        .map(|l| field(l, "t").unwrap().parse().unwrap())
        .collect();
    assert!(t[1] - t[0] >= 100 && t[2] - t[1] >= 200, "tries at {t:?}");
    // A panicking task is retried the same way, and the worker survives it.
    let p = ok(&server, "/t/deliver?task=tasks.panic&p=p2&tries=2");
    server.wait_for_log(
        &format!("task tasks.panic #{} failed after 2 tries", p.id),
        LOG_WAIT,
    );
    assert_eq!(count(&server, &["task=panic", "p=p2"]), 2);
    ok(&server, "/t/deliver?task=tasks.record&p=after");
    wait_lines(&server, &["task=record", "p=after "], 1, LOG_WAIT);
    let info = info(&server);
    assert!(
        info.contains("tasks: 3 accepted, 1 ok, 2 failed, 3 retried"),
        "info:\n{info}"
    );
}

#[test]
fn finish_runs_on_the_delivering_worker() {
    let server = base().start();
    let mut delivered = Vec::new();
    for i in 0..8 {
        let a = ok(&server, &format!("/t/deliver?task=tasks.record&p=fin{i}"));
        delivered.push((i, a.worker));
    }
    let workers: std::collections::BTreeSet<u32> = delivered.iter().map(|d| d.1).collect();
    for (i, worker) in delivered {
        let result = format!("result=done-fin{i} ");
        let done = wait_lines(&server, &["finish=record", &result], 1, LOG_WAIT);
        assert!(
            done[0].contains(&format!("on=Worker:{worker}")),
            "finish of fin{i} (delivered on worker {worker}) ran elsewhere: {}",
            done[0]
        );
        let ran = lines(&server.logs(), &["task=record", &format!("p=fin{i} ")]);
        assert!(ran[0].contains("on=TaskWorker:"), "{}", ran[0]);
    }
    eprintln!("delivered from workers {workers:?}");
}

#[test]
fn deliver_says_why_it_refuses() {
    let server = base().extra("task_queue_size: 2").start();
    // Both task workers busy, queue bound 2 (it counts running tasks too): the third is refused.
    ok(&server, "/t/deliver?task=tasks.sleep&p=1500");
    ok(&server, "/t/deliver?task=tasks.sleep&p=1500");
    assert_eq!(
        call(&server, "/t/deliver?task=tasks.sleep&p=1").unwrap_err(),
        "err QueueFull"
    );
    assert_eq!(
        call(&server, "/t/deliver?task=tasks.nope").unwrap_err(),
        "err UnknownTask"
    );
    assert_eq!(
        call(&server, "/t/fire?event=nope").unwrap_err(),
        "err UnknownEvent"
    );
    assert_eq!(
        call(&server, "/t/send?process=nope&p=x").unwrap_err(),
        "err UnknownProcess"
    );
    // Once the sleepers are done, it accepts again.
    wait_lines(&server, &["task=sleep", "end"], 2, LOG_WAIT);
    let deadline = Instant::now() + LOG_WAIT;
    while call(&server, "/t/deliver?task=tasks.record&p=again").is_err() {
        assert!(Instant::now() < deadline, "the queue never accepted again");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Without task workers, deliver and fire are not enabled.
    let off = Config::empty()
        .plugin("tasks", &job_artifacts().fixture)
        .route("/t/*", "tasks.ctl")
        .start();
    assert_eq!(
        call(&off, "/t/deliver?task=tasks.record").unwrap_err(),
        "err NotEnabled"
    );
    assert_eq!(call(&off, "/t/fire?event=x").unwrap_err(), "err NotEnabled");
}

#[test]
fn listeners_run_in_order_and_one_can_stop_propagation() {
    let server = base()
        .extra(r#"events: { "all": ["tasks.first", "tasks.second", "tasks.third"], "cut": ["tasks.first", "tasks.stopper", "tasks.third"] }"#)
        .start();
    ok(&server, "/t/fire?event=all&p=e1");
    let got = wait_lines(&server, &["listener=", "event=all", "p=e1"], 3, LOG_WAIT);
    let order: Vec<&str> = got.iter().filter_map(|l| field(l, "listener")).collect();
    assert_eq!(order, ["first", "second", "third"]);

    ok(&server, "/t/fire?event=cut&p=e2");
    let got = wait_lines(&server, &["listener=", "event=cut", "p=e2"], 2, LOG_WAIT);
    // Anything after the stopper would have run at once on the same thread; a later event on
    // the same queue proves the first is finished.
    ok(&server, "/t/fire?event=all&p=e3");
    wait_lines(&server, &["listener=third", "p=e3"], 1, LOG_WAIT);
    let got_now = lines(&server.logs(), &["listener=", "event=cut", "p=e2"]);
    let order: Vec<&str> = got_now
        .iter()
        .filter_map(|l| field(l, "listener"))
        .collect();
    assert_eq!(order, ["first", "stopper"], "{got:?}");
}

#[test]
fn a_cron_job_runs_immediately_only_when_asked() {
    let server = base()
        .extra(r#"timer: (enable: true, jobs: [(job: "tasks.tick_a", interval_ms: 2000, immediate: true), (job: "tasks.tick_b", interval_ms: 2000)])"#)
        .start();
    let a = wait_lines(&server, &["cron=tick_a", "n=1 "], 1, LOG_WAIT);
    assert_eq!(
        count(&server, &["cron=tick_b"]),
        0,
        "tick_b ran at once:\n{}",
        server.logs()
    );
    let b = wait_lines(&server, &["cron=tick_b", "n=1 "], 1, LOG_WAIT);
    let ta: u128 = field(&a[0], "t").unwrap().parse().unwrap();
    let tb: u128 = field(&b[0], "t").unwrap().parse().unwrap();
    // Both count from the same start; a late first run of tick_a could only shrink the gap.
    assert!(
        tb >= ta + 1500,
        "tick_b first ran {} ms after tick_a",
        tb - ta
    );
}

#[test]
fn a_cron_job_runs_at_a_fixed_rate() {
    let server = base()
        .extra(r#"timer: (enable: true, jobs: [(job: "tasks.count", interval_ms: 100, immediate: true)])"#)
        .start();
    let runs = wait_lines(&server, &["cron=count"], 26, LOG_WAIT);
    let t: Vec<u128> = runs
        .iter()
        .map(|l| field(l, "t").unwrap().parse().unwrap())
        .collect();
    // Fixed rate: once a run is late, missed ticks are skipped, never made up, so a 2 s window
    // from the first run holds at most 21 runs (+1 for millisecond rounding) however loaded
    // the machine is; and it holds some, or the timer stalled.
    let window = t.iter().filter(|&&x| x <= t[0] + 2000).count();
    assert!((5..=22).contains(&window), "{window} runs in 2 s: {t:?}");
    // No drift: run 26 is not earlier than 25 intervals after run 1.
    assert!(t[25] + 2 >= t[0] + 2500, "26 runs in {} ms", t[25] - t[0]);
}

#[test]
fn a_cron_job_can_end_its_own_schedule() {
    let server = base()
        .extra(r#"timer: (enable: true, jobs: [(job: "tasks.stop3", interval_ms: 50), (job: "tasks.count", interval_ms: 50)])"#)
        .start();
    server.wait_for_log("cron job tasks.stop3 ended its schedule", LOG_WAIT);
    wait_lines(&server, &["cron=count"], 12, LOG_WAIT);
    assert_eq!(count(&server, &["cron=stop3"]), 3);
}

#[test]
fn a_panicking_cron_job_keeps_the_timer_alive() {
    let server = base()
        .hook("tasks.hooks")
        .extra(r#"timer: (enable: true, jobs: [(job: "tasks.panic", interval_ms: 150, immediate: true), (job: "tasks.count", interval_ms: 150)])"#)
        .start();
    wait_lines(&server, &["cron=panic"], 4, LOG_WAIT);
    wait_lines(&server, &["cron=count"], 4, LOG_WAIT);
    let logs = server.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("plugin tasks: cron \"panic\"") && l.contains("panicked")),
        "{logs}"
    );
    assert!(
        !lines(&logs, &["hook=error", "on=Timer:0"]).is_empty(),
        "{logs}"
    );
    let info = info(&server);
    let panics = info
        .lines()
        .find(|l| l.starts_with("cron: "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no cron line in info:\n{info}"));
    assert!(panics >= 4, "info:\n{info}");
}

#[test]
fn a_custom_process_is_restarted_after_a_panic_and_receives_messages() {
    let server = base()
        .hook("tasks.hooks")
        .extra(
            r#"processes: { "echo": (component: "tasks.echo", num: 1, restart_interval_ms: 200) }"#,
        )
        .start();
    wait_lines(&server, &["process=echo panic"], 1, LOG_WAIT);
    wait_lines(&server, &["process=echo started"], 1, LOG_WAIT);
    assert!(!lines(&server.logs(), &["hook=error", "on=Process:0"]).is_empty());
    let a = ok(&server, "/t/send?process=echo&p=m1");
    assert_eq!(a.id, 1, "one instance took it");
    wait_lines(&server, &["process=echo got=m1 "], 1, LOG_WAIT);
    // A process can deliver tasks.
    ok(&server, "/t/send?process=echo&p=deliver:fromproc");
    wait_lines(&server, &["task=record", "p=fromproc "], 1, LOG_WAIT);
    // And on stop it gets on_stop after run returns.
    server.signal(libc::SIGTERM);
    wait_lines(&server, &["process=echo on_stop"], 1, LOG_WAIT);
}

#[test]
fn stop_ends_every_service_thread_within_max_wait_time() {
    let mut server = base()
        .max_wait_time(2)
        .hook("tasks.hooks")
        .extra(r#"timer: (enable: true, jobs: [(job: "tasks.count", interval_ms: 100)], max_wait_time: 1)"#)
        .extra(r#"processes: { "echo": (component: "tasks.echo", num: 2, restart_interval_ms: 100) }"#)
        .start();
    wait_lines(&server, &["process=echo started"], 1, LOG_WAIT);
    wait_lines(&server, &["cron=count"], 2, LOG_WAIT);
    for w in [
        "TaskWorker:0",
        "TaskWorker:1",
        "Timer:0",
        "Process:0",
        "Process:1",
    ] {
        assert_eq!(
            count(&server, &["hook=start", &format!("on={w}")]),
            1,
            "{w}"
        );
    }
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("the server exits");
    let took = started.elapsed();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(2), "stop took {took:?}");
    let logs = server.logs();
    assert!(
        logs.contains("services stopped: 5 thread(s) joined"),
        "{logs}"
    );
    for w in [
        "TaskWorker:0",
        "TaskWorker:1",
        "Timer:0",
        "Process:0",
        "Process:1",
    ] {
        assert_eq!(
            count(&server, &["hook=stop", &format!("on={w}")]),
            1,
            "{w}:\n{logs}"
        );
    }
}

#[test]
fn stop_does_not_wait_past_max_wait_time_for_stuck_plugin_code() {
    let mut server = base()
        .max_wait_time(2)
        .extra(r#"timer: (enable: true, jobs: [(job: "tasks.hang", interval_ms: 100000, immediate: true)], max_wait_time: 1)"#)
        .extra(r#"processes: { "stubborn": (component: "tasks.stubborn", num: 1) }"#)
        .start();
    ok(&server, "/t/deliver?task=tasks.sleep&p=60000");
    ok(&server, "/t/deliver?task=tasks.record&p=queued&delay=30000");
    wait_lines(&server, &["cron=hang start"], 1, LOG_WAIT);
    wait_lines(&server, &["process=stubborn started"], 1, LOG_WAIT);
    wait_lines(&server, &["task=sleep", "start"], 1, LOG_WAIT);
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server
        .wait_exit(Duration::from_secs(15))
        .expect("the server exits");
    let took = started.elapsed();
    assert!(status.success(), "{status}");
    // max_wait_time plus the HTTP workers' half-second grace and a margin for a busy machine.
    assert!(took < Duration::from_secs(5), "stop took {took:?}");
    let logs = server.logs();
    assert!(logs.contains("1 queued task(s)/event(s) dropped"), "{logs}");
    assert!(
        logs.contains("did not return in time and are left behind"),
        "{logs}"
    );
    for who in ["task worker", "timer", "process stubborn#0"] {
        assert!(
            logs.lines()
                .any(|l| l.contains("left behind") && l.contains(who)),
            "{who} not named:\n{logs}"
        );
    }
}

#[test]
fn the_jobs_example_delivers_fires_and_sends() {
    let server = Config::empty()
        .plugin_config("jobs", &job_artifacts().jobs, r#"{ "slow": (ms: 50) }"#)
        .route("/jobs/*", "jobs.jobs")
        .extra("task_worker_num: 1")
        .extra(r#"events: { "order.paid": ["jobs.audit", "jobs.notify"] }"#)
        .extra(r#"timer: (enable: true, jobs: [(job: "jobs.tick", interval_ms: 200)])"#)
        .extra(r#"processes: { "relay": (component: "jobs.relay") }"#)
        .start();
    let resp = server.get("/jobs/task?p=report-42");
    assert_eq!(resp.status, 200, "{}", resp.text());
    server.wait_for_log("\"report-42\" done in", LOG_WAIT);
    assert!(server
        .logs()
        .lines()
        .any(|l| l.contains("finish on worker") && l.contains("report-42")));
    assert_eq!(server.get("/jobs/fire?p=order-7").status, 200);
    server.wait_for_log("notify: order.paid order-7", LOG_WAIT);
    let logs = server.logs();
    let audit = logs.find("audit: order.paid order-7").expect("audit ran");
    assert!(audit < logs.find("notify: order.paid order-7").unwrap());
    server.wait_for_log("relay: started", LOG_WAIT);
    assert_eq!(server.get("/jobs/send?p=hello").status, 200);
    server.wait_for_log("relay: \"hello\"", LOG_WAIT);
    server.wait_for_log("tick 2: delivered task", LOG_WAIT);
}

#[test]
fn bad_service_config_names_the_key_and_line() {
    let (status, stderr) = base()
        .extra(r#"events: { "paid": ["nope.listener"] }"#)
        .start_expect_failure();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("events.paid[0]") && stderr.contains("nope"),
        "{stderr}"
    );
    assert!(stderr.contains("server.ron:"), "{stderr}");
    let (status, stderr) = base()
        .extra(r#"timer: (enable: true, jobs: [(job: "tasks.count", interval_ms: 0)])"#)
        .start_expect_failure();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("timer.jobs[0].interval_ms"), "{stderr}");
    // A component of the wrong kind is refused at start with what the plugin provides.
    let (status, stderr) = base()
        .extra(r#"processes: { "p": (component: "tasks.record") }"#)
        .start_expect_failure();
    assert!(!status.success());
    assert!(stderr.contains("process component \"record\""), "{stderr}");
}

#[test]
fn a_reload_moves_task_workers_the_timer_and_processes_to_the_new_version() {
    let server = base()
        .hook("tasks.hooks")
        .extra(
            r#"processes: { "echo": (component: "tasks.echo", num: 1, restart_interval_ms: 100) }"#,
        )
        .extra(
            r#"timer: (enable: true, jobs: [(job: "tasks.count", interval_ms: 50, immediate: true)])"#,
        )
        .start();
    wait_lines(&server, &["process=echo started"], 1, LOG_WAIT);
    wait_lines(&server, &["cron=count"], 2, LOG_WAIT);
    server.signal(libc::SIGUSR1);
    server.wait_for_log("reloaded plugin tasks", LOG_WAIT);
    // The old process was told, and the new version runs (its first run panics again: the new
    // library has fresh statics).
    wait_lines(&server, &["process=echo on_reload"], 1, LOG_WAIT);
    wait_lines(&server, &["process=echo started"], 2, LOG_WAIT);
    // Task workers swapped instances: old hooks said stop, new ones start.
    wait_lines(&server, &["hook=stop", "on=TaskWorker:0"], 1, LOG_WAIT);
    wait_lines(&server, &["hook=start", "on=TaskWorker:0"], 2, LOG_WAIT);
    // The timer runs the new instance: its counter starts over.
    wait_lines(&server, &["cron=count", " n=1 "], 2, LOG_WAIT);
    // And everything still works.
    ok(&server, "/t/deliver?task=tasks.record&p=after");
    wait_lines(&server, &["task=record", "p=after "], 1, LOG_WAIT);
    ok(&server, "/t/send?process=echo&p=m2");
    wait_lines(&server, &["process=echo got=m2 "], 1, LOG_WAIT);
}

#[test]
fn a_failed_listener_is_retried_from_where_it_failed() {
    let server = base()
        .extra(r#"events: { "retry": ["tasks.first", "tasks.flaky", "tasks.third"] }"#)
        .start();
    ok(&server, "/t/fire?event=retry&p=r1&tries=2");
    let got = wait_lines(&server, &["listener=", "event=retry", "p=r1"], 4, LOG_WAIT);
    let order: Vec<&str> = got.iter().filter_map(|l| field(l, "listener")).collect();
    // first once, flaky twice (it failed, then passed on the retry), third once.
    assert_eq!(order, ["first", "flaky", "flaky", "third"], "{got:?}");
}
