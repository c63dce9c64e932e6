//! The credit model (`common::credits::model`) against the real credit scripts
//! on Redis (redis://127.0.0.1:6379, db 0), the way the rate limiter's GCRA has
//! its twin: seeded-random runs of consumes (keyed or not, retried under the
//! same transaction id), holds opened, settled, released and left to expire,
//! grants, undos of consumes and stored answers go through both, and after
//! every step the replies must agree and the state read back from Redis
//! (balance, held, ver, pending, holds, ended holds, idempotency records,
//! applied grants) must equal the model's.
//!
//! The scripts read Redis's clock (`TIME`), so each step reads it before and
//! after: the model runs at the time before, and a step is held back while a
//! hold's expiry is about to fall inside it. When one falls inside anyway (a
//! slow step), the model is run at each instant the script may have seen and
//! must agree at one of them. Pending `at` and records' `t` are clock values
//! and are not compared, except whether `t` is 0 (marked stale); a new hold's
//! expiry may differ by the step's length and the model then takes Redis's.
//!
//! Every test uses its own key prefix and deletes every key under it when it
//! ends, also when it fails (a guard).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::credits::model::{Hold, IdemState, Keyed, Model, Outcome, Reuse, Step};
use common::redis::keys::Keys;
use common::redis::scripts::{scripts, Reply, Tag, UserKeys};
use redis::Commands;

const URL: &str = "redis://127.0.0.1:6379/0";
/// TTLs of records, hold ends and grants, and the lifetime of long holds: longer than any run.
const LONG_MS: i64 = 3_600_000;
/// How close to a step a hold's expiry may fall before the step waits for it.
const MARGIN_MS: i64 = 25;
const MAX_OPEN: u64 = 3;

fn connect() -> redis::Connection {
    redis::Client::open(URL)
        .and_then(|c| c.get_connection())
        .expect("Redis at redis://127.0.0.1:6379 (the local services)")
}

/// Redis's clock, ms (what the scripts call `now`).
fn clock(conn: &mut redis::Connection) -> i64 {
    let (s, us): (i64, i64) = redis::cmd("TIME").query(conn).unwrap();
    s * 1000 + us / 1000
}

/// Deletes every key under the test's prefix when dropped.
struct Cleanup {
    prefix: String,
}

impl Cleanup {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Self {
            prefix: format!("credit_model_{name}_{}_{nanos}", std::process::id()),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut c = connect();
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}:*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query(&mut c)
                .expect("SCAN");
            if !keys.is_empty() {
                let _: () = c.del(keys).expect("DEL");
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
}

/// The idempotency part of a keyed operation.
#[derive(Debug, Clone)]
struct Key {
    record: String,
    hash: String,
    window_ms: i64,
    reuse: Reuse,
}

impl Key {
    fn model(&self) -> Keyed<'_> {
        Keyed {
            key: &self.record,
            hash: &self.hash,
            window_ms: self.window_ms,
            reuse: self.reuse,
        }
    }
}

/// One operation, with the arguments its script takes (TTLs aside).
#[derive(Debug, Clone)]
enum Op {
    /// consume: (keyed, tx, amount).
    Consume(Option<Key>, String, i64),
    /// consume_undo: (keyed, tx, give_back, forget).
    Undo(Option<Key>, String, bool, bool),
    /// idem_finish: (record, answer, id).
    Finish(Key, String, String),
    /// hold_open: (keyed, hold id, amount, lifetime ms).
    Open(Option<Key>, String, i64, i64),
    /// hold_settle: (hold id, tx, amount).
    Settle(String, String, i64),
    /// hold_release: (hold id).
    Release(String),
    /// grant_apply: (grant id, amount).
    Grant(String, i64),
}

/// A script's answer: a credit script's reply, or idem_finish's 1 | 0.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Reply(Reply),
    Stored(bool),
}

/// The state as compared: clock values left out (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct State {
    bal: i64,
    held: i64,
    ver: i64,
    pending: BTreeMap<String, i64>,
    holds: BTreeMap<String, String>,
    ended: BTreeMap<String, String>,
    /// record → (hash, st, tx or answer, t is 0).
    idem: BTreeMap<String, (String, String, String, bool)>,
    grants: BTreeSet<String>,
}

impl State {
    fn of(m: &Model) -> Self {
        let idem = m.idem.iter().map(|(k, r)| {
            let v = match &r.state {
                IdemState::Run { id, started_ms } => {
                    ("run".to_string(), id.clone(), *started_ms == 0)
                }
                IdemState::Done { answer } => ("done".to_string(), answer.clone(), false),
            };
            (k.clone(), (r.hash.clone(), v.0, v.1, v.2))
        });
        Self {
            bal: m.bal,
            held: m.held,
            ver: m.ver,
            pending: m
                .pending
                .iter()
                .map(|(k, p)| (k.clone(), p.amount))
                .collect(),
            holds: m.holds.iter().map(|(k, h)| (k.clone(), h.json())).collect(),
            ended: m.ended.clone(),
            idem: idem.collect(),
            grants: m.grants.clone(),
        }
    }
}

/// Whether the model's state is the one read back; the difference if not.
fn check_state(model: &Model, real: &State) -> Result<(), String> {
    let m = State::of(model);
    if &m == real {
        return Ok(());
    }
    let mut diff = Vec::new();
    macro_rules! field {
        ($f:ident) => {
            if m.$f != real.$f {
                diff.push(format!(
                    "{}: model {:?}, Redis {:?}",
                    stringify!($f),
                    m.$f,
                    real.$f
                ));
            }
        };
    }
    field!(bal);
    field!(held);
    field!(ver);
    field!(pending);
    field!(holds);
    field!(ended);
    field!(idem);
    field!(grants);
    Err(diff.join("; "))
}

/// Whether the model's reply is the script's. Expired holds are compared as
/// a set (Redis lists them in hash order); a new hold's expiry may differ by
/// up to `slack_ms` (the step's length on Redis's clock).
fn check_reply(model: &Step, real: &Answer, slack_ms: i64) -> Result<(), String> {
    let Answer::Reply(real) = real else {
        return Err(format!("model {model:?}, Redis {real:?}"));
    };
    let mine = model.reply();
    let sorted = |r: &Reply| {
        let mut e = r.expired.clone();
        e.sort_by(|a, b| a.hold_id.cmp(&b.hold_id));
        e
    };
    let mut fields = mine.fields.clone();
    if let (Outcome::Opened(_, exp, made), Ok(theirs)) = (&model.outcome, real.int(2)) {
        if made.created && (theirs - exp).abs() <= slack_ms {
            fields[2] = theirs.to_string();
        }
    }
    if mine.tag == real.tag && sorted(&mine) == sorted(real) && fields == real.fields {
        Ok(())
    } else {
        Err(format!("model {mine:?}, Redis {real:?}"))
    }
}

/// A seeded xorshift64*, so every run of a seed is the same sequence.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    fn pick<T: Clone>(&mut self, v: &[T]) -> Option<T> {
        (!v.is_empty()).then(|| v[self.below(v.len() as u64) as usize].clone())
    }
}

/// One user on Redis and its model, stepped together.
struct Run {
    conn: redis::Connection,
    keys: Keys,
    user: String,
    uk: UserKeys,
    model: Model,
    txs: Vec<String>,
    hold_ids: Vec<String>,
    records: BTreeSet<String>,
    /// Tags (and "expired", "retry", "ambiguous") seen, for the coverage check.
    seen: BTreeMap<String, usize>,
    n: usize,
}

impl Run {
    /// A user loaded as the gateway loads one (init.lua), with the given open holds.
    fn load(prefix: &str, user: &str, ledger: i64, holds: &[(String, Hold)]) -> Self {
        let mut conn = connect();
        let keys = Keys::new(prefix);
        let uk = UserKeys::new(&keys, user);
        let _: () = conn.set(&uk.sentinel, "1").unwrap();
        let mut inv = uk.invoke(&scripts().init, LONG_MS as u64);
        inv.arg(ledger).arg("").arg("");
        for (id, h) in holds {
            inv.arg(id).arg(h.json());
        }
        let raw: Vec<String> = inv.invoke(&mut conn).unwrap();
        let (model, step) = Model::init(ledger, holds);
        let mut run = Self {
            conn,
            keys,
            user: user.to_string(),
            uk,
            model,
            txs: Vec::new(),
            hold_ids: holds.iter().map(|(id, _)| id.clone()).collect(),
            records: BTreeSet::new(),
            seen: BTreeMap::new(),
            n: 0,
        };
        check_reply(&step, &Answer::Reply(Reply::parse(raw).unwrap()), 0).unwrap();
        let state = run.read();
        check_state(&run.model, &state).unwrap();
        run
    }

    fn clock(&mut self) -> i64 {
        clock(&mut self.conn)
    }

    fn read(&mut self) -> State {
        let c = &mut self.conn;
        let cred: BTreeMap<String, String> = c.hgetall(&self.uk.credits).unwrap();
        let num = |k: &str| cred.get(k).map_or(0, |v| v.parse().unwrap());
        let pending: BTreeMap<String, String> = c.hgetall(&self.uk.pending).unwrap();
        let pending = pending
            .into_iter()
            .map(|(k, v)| (k, common::redis::scripts::parse_pending(&v).unwrap().0))
            .collect();
        let holds = c.hgetall(&self.uk.holds).unwrap();
        let names: Vec<String> = self
            .hold_ids
            .iter()
            .map(|id| self.keys.hold_end(&self.user, id))
            .collect();
        let ends: Vec<Option<String>> = match names.is_empty() {
            true => Vec::new(),
            false => redis::cmd("MGET").arg(&names).query(c).unwrap(),
        };
        let ended = self
            .hold_ids
            .iter()
            .cloned()
            .zip(ends)
            .filter_map(|(id, v)| Some((id, v?)))
            .collect();
        let mut idem = BTreeMap::new();
        for key in &self.records {
            let r: BTreeMap<String, String> = c.hgetall(key).unwrap();
            let get = |f: &str| r.get(f).cloned().unwrap_or_default();
            if !r.is_empty() {
                let v = if get("st") == "run" {
                    get("tx")
                } else {
                    get("ans")
                };
                // A 'done' record keeps the `tx` and `t` of its run (idem_finish only
                // adds `st` and `ans`); only a 'run' record's `t` is ever read.
                let stale = get("st") == "run" && get("t") == "0";
                idem.insert(key.clone(), (get("h"), get("st"), v, stale));
            }
        }
        let grants = c.smembers(self.keys.grants_applied(&self.user)).unwrap();
        State {
            bal: num("bal"),
            held: num("held"),
            ver: num("ver"),
            pending,
            holds,
            ended,
            idem,
            grants,
        }
    }

    /// The op through its script, invoked as the gateway invokes it.
    fn real(&mut self, op: &Op) -> Answer {
        macro_rules! strs { ($($a:expr),*) => { vec![$($a.to_string()),*] } }
        let s = scripts();
        let unkeyed = self.keys.idempotency(&self.user, "model", "-");
        let key_of = |k: &Option<Key>| match k {
            Some(k) => (k.record.clone(), k.hash.clone(), k.window_ms, k.reuse.arg()),
            None => (unkeyed.clone(), String::new(), 0, "0"),
        };
        let (ttl, flag) = (LONG_MS, |b: &bool| if *b { "1" } else { "0" });
        let (script, key, args) = match op {
            Op::Finish(keyed, answer, id) => {
                let mut inv = s.idem_finish.prepare_invoke();
                inv.key(&keyed.record)
                    .arg(&keyed.hash)
                    .arg(answer)
                    .arg(ttl)
                    .arg(id);
                return Answer::Stored(inv.invoke::<i64>(&mut self.conn).unwrap() == 1);
            }
            Op::Consume(keyed, tx, amount) => {
                let (record, hash, window, reuse) = key_of(keyed);
                (
                    &s.consume,
                    Some(record),
                    strs![hash, tx, amount, window, ttl, ttl, reuse],
                )
            }
            Op::Undo(keyed, tx, give_back, forget) => {
                let (record, hash, ..) = key_of(keyed);
                (
                    &s.consume_undo,
                    Some(record),
                    strs![hash, tx, flag(give_back), flag(forget)],
                )
            }
            Op::Open(keyed, id, amount, lifetime_ms) => {
                let (record, hash, window, reuse) = key_of(keyed);
                let args = strs![
                    hash,
                    id,
                    amount,
                    lifetime_ms,
                    window,
                    ttl,
                    ttl,
                    reuse,
                    MAX_OPEN
                ];
                (&s.hold_open, Some(record), args)
            }
            Op::Settle(id, tx, amount) => (&s.hold_settle, None, strs![id, tx, amount]),
            Op::Release(id) => (&s.hold_release, None, strs![id]),
            Op::Grant(id, amount) => {
                let applied = self.keys.grants_applied(&self.user);
                (
                    &s.grant_apply,
                    Some(applied),
                    strs![id, amount, ttl + 3_600_000],
                )
            }
        };
        let mut inv = self.uk.invoke(script, ttl as u64);
        inv.key(key);
        for a in args {
            inv.arg(a);
        }
        let raw: Vec<String> = inv.invoke(&mut self.conn).unwrap();
        Answer::Reply(Reply::parse(raw).unwrap())
    }

    /// The model's step at `now_ms` (`None` for idem_finish, whose answer is `stored`).
    fn apply(model: &mut Model, op: &Op, now_ms: i64) -> Result<Step, bool> {
        Ok(match op {
            Op::Consume(keyed, tx, amount) => {
                model.consume(now_ms, keyed.as_ref().map(Key::model).as_ref(), tx, *amount)
            }
            Op::Undo(keyed, tx, give_back, forget) => {
                let k = keyed.as_ref().map(|k| (k.record.as_str(), k.hash.as_str()));
                model.consume_undo(k, tx, *give_back, *forget)
            }
            Op::Finish(keyed, answer, id) => {
                return Err(model.idem_finish(&keyed.record, &keyed.hash, answer, id))
            }
            Op::Open(keyed, id, amount, lifetime_ms) => {
                let k = keyed.as_ref().map(Key::model);
                model.hold_open(now_ms, k.as_ref(), id, *amount, *lifetime_ms, MAX_OPEN)
            }
            Op::Settle(id, tx, amount) => model.hold_settle(now_ms, id, tx, *amount),
            Op::Release(id) => model.hold_release(now_ms, id),
            Op::Grant(id, amount) => model.grant_apply(id, *amount),
        })
    }

    /// One step through both; panics with the step, the op and the difference.
    fn step(&mut self, op: &Op) {
        self.n += 1;
        let t0 = loop {
            let t0 = self.clock();
            let near = self
                .model
                .holds
                .values()
                .map(|h| h.expires_at_ms)
                .filter(|&e| e > t0 && e <= t0 + MARGIN_MS)
                .max();
            match near {
                Some(e) => std::thread::sleep(Duration::from_millis((e - t0 + 1) as u64)),
                None => break t0,
            }
        };
        let real = self.real(op);
        let t1 = self.clock();
        let state = self.read();
        // The instants the script may have seen that differ for the model: t0,
        // then each expiry inside the step.
        let mut at: Vec<i64> = self
            .model
            .holds
            .values()
            .map(|h| h.expires_at_ms)
            .filter(|&e| e > t0 && e <= t1)
            .collect();
        at.sort_unstable();
        at.insert(0, t0);
        if at.len() > 1 {
            *self.seen.entry("ambiguous".into()).or_default() += 1;
        }
        let mut errors = Vec::new();
        for now in at {
            let mut model = self.model.clone();
            let checked = match (Self::apply(&mut model, op, now), &real) {
                (Err(stored), Answer::Stored(theirs)) if stored == *theirs => Ok(None),
                (Err(stored), _) => Err(format!("model stored {stored}, Redis {real:?}")),
                (Ok(step), _) => check_reply(&step, &real, t1 - t0).map(|()| Some(step)),
            };
            let checked = checked.and_then(|step| {
                let opened = step.as_ref().map(|s| &s.outcome);
                if let (Some(Outcome::Opened(_, _, made)), Answer::Reply(r)) = (opened, &real) {
                    model.holds.get_mut(&made.id).unwrap().expires_at_ms = r.int(2).unwrap();
                }
                check_state(&model, &state).map(|()| step)
            });
            match checked {
                Ok(step) => {
                    self.model = model;
                    self.count(step.as_ref());
                    return;
                }
                Err(e) => errors.push(format!("at {now}: {e}")),
            }
        }
        panic!(
            "step {} {op:?} (Redis clock {t0}..{t1}): {}",
            self.n,
            errors.join(" | ")
        );
    }

    fn count(&mut self, step: Option<&Step>) {
        let Some(step) = step else {
            *self.seen.entry("FINISH".into()).or_default() += 1;
            return;
        };
        *self.seen.entry(step.tag().as_str().into()).or_default() += 1;
        if !step.expired.is_empty() {
            *self.seen.entry("expired".into()).or_default() += 1;
        }
        if let Outcome::Consumed(_, m) | Outcome::Opened(_, _, m) = &step.outcome {
            let what = match (m.created, m.reused) {
                (false, _) => "retry",
                (true, true) => "reused",
                (true, false) => "created",
            };
            *self.seen.entry(what.into()).or_default() += 1;
        }
    }

    fn key(&mut self, rng: &mut Rng, route: &str) -> Key {
        let record = self
            .keys
            .idempotency(&self.user, route, &format!("k{}", rng.below(3)));
        self.records.insert(record.clone());
        let reuse = [Reuse::Fresh, Reuse::Recorded, Reuse::Again][rng.below(3) as usize];
        let hash = if rng.chance(15) { "hb" } else { "ha" }.to_string();
        Key {
            record,
            hash,
            window_ms: if rng.chance(50) { 0 } else { LONG_MS },
            reuse,
        }
    }

    fn tx(&mut self, rng: &mut Rng, retry_pct: u64) -> String {
        match rng.chance(retry_pct).then(|| rng.pick(&self.txs)).flatten() {
            Some(tx) => tx,
            None => {
                let tx = format!("tx{}", self.txs.len());
                self.txs.push(tx.clone());
                tx
            }
        }
    }

    /// A hold id: mostly an open one, else one used before or a new one.
    fn hold(&mut self, rng: &mut Rng, open_pct: u64) -> String {
        let open: Vec<String> = self.model.holds.keys().cloned().collect();
        if let Some(id) = rng.chance(open_pct).then(|| rng.pick(&open)).flatten() {
            return id;
        }
        match rng.chance(50).then(|| rng.pick(&self.hold_ids)).flatten() {
            Some(id) => id,
            None => {
                let id = format!("h{}", self.hold_ids.len());
                self.hold_ids.push(id.clone());
                id
            }
        }
    }

    /// A record key, and for undo and finish mostly the id running under it.
    fn key_and_id(&mut self, rng: &mut Rng, route: &str) -> (Key, String) {
        let keyed = self.key(rng, route);
        let running = match self.model.idem.get(&keyed.record).map(|r| &r.state) {
            Some(IdemState::Run { id, .. }) if rng.chance(75) => Some(id.clone()),
            _ => None,
        };
        let id = running.unwrap_or_else(|| self.tx(rng, 90));
        (keyed, id)
    }

    fn random_op(&mut self, rng: &mut Rng) -> Op {
        // Amounts around the balance (so both OK and INSUFFICIENT), or small.
        let bal = self.model.bal;
        let amount = |rng: &mut Rng| match rng.chance(50) {
            true => 1 + rng.below(bal.max(4) as u64 * 3 / 2) as i64,
            false => 1 + rng.below(10) as i64,
        };
        match rng.below(100) {
            0..=27 => {
                let keyed = rng.chance(40).then(|| self.key(rng, "consume"));
                Op::Consume(keyed, self.tx(rng, 25), amount(rng))
            }
            28..=55 => {
                let keyed = rng.chance(30).then(|| self.key(rng, "holds"));
                let id = self.hold(rng, 10);
                let lifetime_ms = if rng.chance(35) {
                    1 + rng.below(40) as i64
                } else {
                    LONG_MS
                };
                Op::Open(keyed, id, amount(rng), lifetime_ms)
            }
            56..=67 => {
                let id = self.hold(rng, 85);
                let held = self.model.holds.get(&id).map_or(5, |h| h.amount as u64);
                let amount = if rng.chance(15) {
                    held + 1 + rng.below(5)
                } else {
                    rng.below(held + 1)
                };
                Op::Settle(id, self.tx(rng, 15), amount as i64)
            }
            68..=75 => Op::Release(self.hold(rng, 85)),
            76..=82 => {
                let id = format!("g{}", rng.below(self.n as u64 / 3 + 1));
                Op::Grant(id, 1 + rng.below(300) as i64)
            }
            83..=92 => {
                let (keyed, tx) = self.key_and_id(rng, "consume");
                let keyed = rng.chance(80).then_some(keyed);
                Op::Undo(keyed, tx, rng.chance(60), rng.chance(40))
            }
            _ => {
                let route = if rng.chance(50) { "consume" } else { "holds" };
                let (keyed, id) = self.key_and_id(rng, route);
                Op::Finish(keyed, format!(r#"{{"status":200,"step":{}}}"#, self.n), id)
            }
        }
    }
}

#[test]
fn the_scripts_and_the_model_agree_over_seeded_random_runs() {
    let cleanup = Cleanup::new("runs");
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for seed in 1..=6u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let now = clock(&mut connect());
        // Loaded with one long hold and, for odd seeds, one already due.
        let hold = |id: &str, amount, expires_at_ms| {
            (
                id.to_string(),
                Hold {
                    amount,
                    expires_at_ms,
                },
            )
        };
        let mut holds = vec![hold("p0", 40, now + LONG_MS)];
        if seed % 2 == 1 {
            holds.push(hold("p1", 25, now - 1));
        }
        let (user, ledger) = (format!("user{seed}"), 400 + 100 * seed as i64);
        let mut run = Run::load(&cleanup.prefix, &user, ledger, &holds);
        for _ in 0..300 {
            let op = run.random_op(&mut rng);
            run.step(&op);
            if rng.chance(3) {
                std::thread::sleep(Duration::from_millis(5 + rng.below(30)));
            }
        }
        for (k, v) in run.seen {
            *seen.entry(k).or_default() += v;
        }
    }
    eprintln!("seen over all runs: {seen:?}");
    let tags = "OK INSUFFICIENT CONFLICT BUSY REPLAY STALE UNPENDING ENDED GONE TOO_MUCH TOO_MANY";
    let others = " expired retry reused created FINISH";
    let mut missing: Vec<&str> = tags.split(' ').chain(others.split(' ').skip(1)).collect();
    missing.retain(|k| !seen.contains_key(*k));
    assert!(
        missing.is_empty(),
        "the runs never saw {missing:?} (seen {seen:?})"
    );
    let steps = 6 * 300;
    assert!(
        seen.get("ambiguous").copied().unwrap_or(0) * 20 < steps,
        "too many slow steps: {seen:?}"
    );
    drop(cleanup);
}

#[test]
fn a_wrong_model_is_caught() {
    let cleanup = Cleanup::new("wrong");
    let mut run = Run::load(&cleanup.prefix, "user", 100, &[]);
    let op = Op::Consume(None, "t1".into(), 30);
    run.step(&op);
    let state = run.read();
    assert_eq!(state.bal, 70);
    check_state(&run.model, &state).unwrap();
    // Off by one in the balance: the state comparison names it.
    let mut wrong = run.model.clone();
    wrong.bal += 1;
    let err = check_state(&wrong, &state).unwrap_err();
    assert!(err.starts_with("bal: model 71, Redis 70"), "{err}");
    // A model that forgets to bump ver, or to keep the pending entry.
    let mut wrong = run.model.clone();
    wrong.ver -= 1;
    assert!(check_state(&wrong, &state).is_err());
    let mut wrong = run.model.clone();
    wrong.pending.clear();
    assert!(check_state(&wrong, &state).is_err());
    // Replies: the same consume off by one, or with another tag, disagrees.
    let op = Op::Consume(None, "t2".into(), 10);
    let real = run.real(&op);
    let mut model = run.model.clone();
    let step = Run::apply(&mut model, &op, run.clock()).unwrap();
    check_reply(&step, &real, 0).unwrap();
    let mut off = run.model.clone();
    off.bal += 1;
    let step = Run::apply(&mut off, &op, 0).unwrap();
    assert!(check_reply(&step, &real, 0).is_err());
    let mut poor = run.model.clone();
    poor.bal = 5;
    let step = Run::apply(&mut poor, &op, 0).unwrap();
    assert_eq!(step.tag(), Tag::Insufficient);
    assert!(check_reply(&step, &real, 0).is_err());
    // And the step driver panics on a wrong model rather than passing.
    run.model = model;
    run.model.held += 1;
    let wrong_step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run.step(&Op::Grant("g".into(), 1));
    }));
    assert!(wrong_step.is_err(), "a wrong model passed a step");
    drop(cleanup);
}
