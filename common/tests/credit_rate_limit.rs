//! The merged credit scripts (the rate limit decided first, then the
//! reservation, in one call) against the model (`common::credits::model`):
//! seeded-random arrivals on a synthetic microsecond clock (the optional
//! ARGV after the limit, as the gateway's GCRA test drives `GCRA_LUA`) go
//! through `consume`, `hold_open`, `hold_settle` and `hold_release` with the
//! limit and through [`Model::rate_limit`] then the model's step. After every
//! call the replies must agree (the `RL` decision included), the stored TAT
//! must be the model's, and a refused call must leave every other key as it
//! was: no reservation, no idempotency record. Redis at 127.0.0.1:6379.

use common::credits::model::{Model, Reuse};
use common::redis::keys::Keys;
use common::redis::scripts::{scripts, Reply, Tag, UserKeys};
use redis::Commands;

const LONG_MS: i64 = 3_600_000;

/// A seeded xorshift: a number in `0..n`.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: i64) -> i64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as i64
    }
}

fn dump(c: &mut redis::Connection, keys: &[String]) -> Vec<Option<Vec<u8>>> {
    keys.iter()
        .map(|k| redis::cmd("DUMP").arg(k).query(c).unwrap())
        .collect()
}

#[test]
fn the_merged_scripts_and_the_model_agree_on_limit_and_reservation() {
    let mut c = redis::Client::open("redis://127.0.0.1:6379/0")
        .and_then(|c| c.get_connection())
        .expect("Redis at 127.0.0.1:6379");
    let prefix = format!(
        "credit_rl_{}_{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let keys = Keys::new(&prefix);
    let user = "u1";
    let uk = UserKeys::new(&keys, user);
    let rl = keys.rate_limit(user, "credits");
    let _: () = c.set(&uk.sentinel, "1").unwrap();
    let init: Vec<String> = uk
        .invoke(&scripts().init, LONG_MS as u64)
        .arg(1000)
        .arg("")
        .arg("")
        .invoke(&mut c)
        .unwrap();
    assert_eq!(Reply::parse(init).unwrap().kind(), Tag::Ok);
    let mut model = Model::init(1000, &[]).0;
    let mut rng = Rng(0x11_5eed);
    let (limit, window) = (7u64, 60u64);
    let interval = (window * 1_000_000 / limit) as i64;
    let mut now_us: i64 = 1_700_000_000_000_000;
    let (mut refused, mut passed) = (0, 0);
    let mut open_hold: Option<String> = None;
    for i in 0..400 {
        now_us += match rng.below(10) {
            0..=4 => 0,
            5..=8 => rng.below(2 * interval),
            _ => rng.below(window as i64 * 1_000_000),
        };
        let record = keys.idempotency(user, "consume", &format!("k{i}"));
        let watched = [
            uk.credits.clone(),
            uk.pending.clone(),
            uk.holds.clone(),
            record.clone(),
        ];
        let before = dump(&mut c, &watched);
        let state = model.clone();
        let decided = model.rate_limit(&rl, limit, window, now_us);
        let tx = format!("tx{i}");
        // 0 consume, 1 open a hold, 2 settle the open one.
        let op = match (rng.below(3), &open_hold) {
            (0, _) => 0,
            (_, None) => 1,
            (_, Some(_)) => 2,
        };
        let mut inv = match (op, &open_hold) {
            (1, _) => {
                let mut inv = uk.invoke(&scripts().hold_open, LONG_MS as u64);
                inv.key(&record)
                    .arg("")
                    .arg(&tx)
                    .arg(3)
                    .arg(LONG_MS)
                    .arg(LONG_MS)
                    .arg(LONG_MS)
                    .arg(LONG_MS)
                    .arg("0")
                    .arg(1);
                inv
            }
            (2, Some(h)) => {
                let mut inv = uk.invoke(&scripts().hold_settle, LONG_MS as u64);
                inv.arg(h).arg(&tx).arg(2);
                inv
            }
            _ => {
                let mut inv = uk.invoke(&scripts().consume, LONG_MS as u64);
                inv.key(&record)
                    .arg("h")
                    .arg(&tx)
                    .arg(5)
                    .arg(LONG_MS)
                    .arg(LONG_MS)
                    .arg(LONG_MS)
                    .arg(Reuse::Fresh.arg());
                inv
            }
        };
        inv.key(&rl).arg(limit).arg(window).arg(now_us);
        let raw: Vec<String> = inv.invoke(&mut c).unwrap();
        let reply = Reply::parse(raw).unwrap();
        assert_eq!(reply.rate_limit, Some(decided), "arrival {i} at {now_us}");
        let tat: Option<i64> = c.get(&rl).unwrap();
        assert_eq!(
            tat,
            model.rate_limits.get(&rl).copied(),
            "stored TAT, arrival {i}"
        );
        if !decided.allowed {
            refused += 1;
            assert_eq!(reply.kind(), Tag::Limited);
            assert_eq!(
                dump(&mut c, &watched),
                before,
                "a refusal changes nothing, arrival {i}"
            );
            assert_eq!(
                (model.bal, &model.pending, &model.holds),
                (state.bal, &state.pending, &state.holds)
            );
            continue;
        }
        passed += 1;
        let step = match (op, &open_hold) {
            (1, _) => model.hold_open(0, None, &tx, 3, LONG_MS, 1),
            (2, Some(h)) => model.hold_settle(0, h, &tx, 2),
            _ => model.consume(0, Some(&keyed(&record)), &tx, 5),
        };
        let mut want = step.reply();
        want.rate_limit = Some(decided);
        assert_eq!(
            reply.kind(),
            want.kind(),
            "arrival {i}: {reply:?} vs {want:?}"
        );
        match (op, reply.kind()) {
            // A hold's expiry is Redis's clock plus its lifetime; the model
            // runs at 0, so only the expiry (and the settled hold's JSON) differ.
            (1, Tag::Ok) => {
                want.fields[2] = reply.fields[2].clone();
                assert_eq!(reply, want, "arrival {i}");
                open_hold = Some(tx.clone());
            }
            (2, Tag::Ok) => {
                assert_eq!(reply.fields[..3], want.fields[..3], "arrival {i}");
                open_hold = None;
            }
            _ => assert_eq!(reply, want, "arrival {i}"),
        }
        let bal: i64 = c.hget(&uk.credits, "bal").unwrap();
        assert_eq!(bal, model.bal, "arrival {i}");
    }
    assert!(
        refused > 0 && passed > 0,
        "{refused} refused, {passed} passed"
    );
    let mut cursor = 0u64;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .query(&mut c)
            .unwrap();
        if !found.is_empty() {
            let _: () = c.del(found).unwrap();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

fn keyed(record: &str) -> common::credits::model::Keyed<'_> {
    common::credits::model::Keyed {
        key: record,
        hash: "h",
        window_ms: LONG_MS,
        reuse: Reuse::Fresh,
    }
}
