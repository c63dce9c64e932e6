//! One Redis client for a single node and for Redis Cluster.
//!
//! [`Client`] is made from the settings: `redis.cluster_urls` set means a
//! cluster client (`redis::cluster_async`), else the `redis.url` node.
//! [`Conn`] (a shared connection) and [`PoolConn`] (one from [`Pool`]) are
//! `redis::aio::ConnectionLike`, so every `query_async`, `Script` and
//! pipeline runs on either; nothing else in the code knows which mode it
//! runs in. What a cluster needs besides:
//!
//! - a non-atomic pipeline whose commands span slots (the finish batch, the
//!   sentinel writes, a rebuild) is split by slot and its replies put back in
//!   order ([`split_by_slot`]); an atomic one must stay in one slot;
//! - a SCAN walks every master ([`scan_match`]).
//!
//! MOVED and ASK are followed by the cluster client; a slot without a master
//! (CLUSTERDOWN, a node that refuses) fails that command only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, RedisResult, Value};

use super::slot::key_slot;
use crate::settings::RedisSettings;
use crate::tls::TlsMaterial;

/// A client for the node of `redis.url` or for the cluster of `redis.cluster_urls`.
#[derive(Clone)]
pub enum Client {
    Single(redis::Client),
    Cluster(ClusterClient),
}

impl Client {
    /// From the settings (`REDIS_CLUSTER_URLS` wins over `REDIS_URL`);
    /// `rediss://` verifies servers as `common::tls` does. `timeout` bounds
    /// connecting and each reply.
    pub fn from_settings(redis: &RedisSettings, material: &TlsMaterial) -> anyhow::Result<Self> {
        let nodes = redis.cluster_nodes();
        if nodes.is_empty() {
            Self::single(&redis.url, material)
        } else {
            Self::cluster(&nodes, material, Duration::from_millis(redis.timeout_ms))
        }
    }

    /// One node (`redis://host/N` selects database N).
    pub fn single(url: &str, material: &TlsMaterial) -> anyhow::Result<Self> {
        let client = crate::tls::redis_client(url, material)
            .map_err(|e| anyhow::anyhow!("REDIS_URL: {e}"))?;
        Ok(Self::Single(client))
    }

    /// A cluster, discovered from any of `nodes`.
    pub fn cluster(
        nodes: &[String],
        material: &TlsMaterial,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut b = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            // A slot whose master is gone fails fast (its users get a 503);
            // MOVED/ASK are followed within these.
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(200);
        if nodes.iter().any(|u| u.starts_with("rediss://")) && !material.is_empty() {
            let root_cert = match &material.ca_pem {
                Some(ca) => Some(
                    crate::tls::system_roots_with(ca)
                        .map_err(|e| anyhow::anyhow!("tls.ca_file: {e}"))?,
                ),
                None => None,
            };
            b = b.certs(redis::TlsCertificates {
                client_tls: material.client.as_ref().map(|c| redis::ClientTlsConfig {
                    client_cert: c.cert_pem.clone(),
                    client_key: c.key_pem.clone(),
                }),
                root_cert,
            });
        }
        let client = b
            .build()
            .map_err(|e| anyhow::anyhow!("REDIS_CLUSTER_URLS: {e}"))?;
        Ok(Self::Cluster(client))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// A shared connection (multiplexed; for a cluster, one per node behind it).
    pub async fn connect(&self, timeout: Duration) -> RedisResult<Conn> {
        match self {
            Self::Single(c) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout);
                Ok(Conn::Single(
                    c.get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Self::Cluster(c) => Ok(Conn::Cluster(
                c.get_async_connection().await?,
                Arc::default(),
            )),
        }
    }
}

/// A shared connection to the node or the cluster; clones share it.
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection, Arc<SlotMap>),
}

impl Conn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(..))
    }

    /// PING: the node; on a cluster any one node (a master gone takes its
    /// slots' users a 503 each, not the whole deployment out of readiness).
    pub async fn ping(&mut self) -> RedisResult<String> {
        let ping = redis::cmd("PING");
        match self {
            Self::Single(c) => ping.query_async(c).await,
            Self::Cluster(c, _) => {
                let v = c
                    .route_command(
                        &ping,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                    )
                    .await?;
                redis::from_redis_value(&v)
            }
        }
    }

    /// `items` in the groups one multi-key script call may take: all of them
    /// on a single node, one group per slot (of `key`) on a cluster, in
    /// first-seen order.
    pub fn by_slot<'a, T>(&self, items: &'a [T], key: impl Fn(&T) -> &str) -> Vec<Vec<&'a T>> {
        if !self.is_cluster() {
            return if items.is_empty() {
                Vec::new()
            } else {
                vec![items.iter().collect()]
            };
        }
        let mut groups: Vec<Vec<&T>> = Vec::new();
        let mut index: HashMap<u16, usize> = HashMap::new();
        for item in items {
            let g = *index
                .entry(key_slot(key(item).as_bytes()))
                .or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
            groups[g].push(item);
        }
        groups
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c, _) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipe, offset, count),
            Self::Cluster(c, map) => Box::pin(cluster_pipeline(c, map, pipe, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(..) => 0,
        }
    }
}

/// Each slot range's master, from `CLUSTER SLOTS`, kept for a few seconds:
/// a pipeline spanning slots goes to each master in one sub-pipeline.
#[derive(Default)]
pub struct SlotMap {
    ranges: std::sync::Mutex<Option<(std::time::Instant, Ranges)>>,
}

type Ranges = Arc<Vec<(u16, u16, String, u16)>>;

const SLOT_MAP_FOR: Duration = Duration::from_secs(5);

impl SlotMap {
    async fn get(&self, c: &mut ClusterConnection) -> RedisResult<Ranges> {
        if let Some((at, r)) = &*self.ranges.lock().expect("lock") {
            if at.elapsed() < SLOT_MAP_FOR {
                return Ok(r.clone());
            }
        }
        let cmd = redis::cmd("CLUSTER").arg("SLOTS").clone();
        let reply = c
            .route_command(&cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
            .await?;
        let mut ranges = Vec::new();
        for r in redis::from_redis_value::<Vec<Value>>(&reply)? {
            let items: Vec<Value> = redis::from_redis_value(&r)?;
            let (from, to): (u16, u16) =
                redis::from_redis_value(&Value::Array(items.into_iter().take(2).collect()))?;
            let (host, port) = range_master(&r)?;
            ranges.push((from, to, host, port));
        }
        let ranges = Arc::new(ranges);
        *self.ranges.lock().expect("lock") = Some((std::time::Instant::now(), ranges.clone()));
        Ok(ranges)
    }

    fn forget(&self) {
        *self.ranges.lock().expect("lock") = None;
    }
}

/// A pipeline on a cluster: as is when atomic or within one slot, else one
/// sub-pipeline per master (concurrently), the replies in the original
/// order. A master's part that fails is tried again slot by slot (the
/// cluster client follows MOVED there); a command whose keys span slots
/// runs alone, split by the cluster client.
async fn cluster_pipeline(
    c: &mut ClusterConnection,
    map: &SlotMap,
    pipe: &Pipeline,
    offset: usize,
    count: usize,
) -> RedisResult<Vec<Value>> {
    let groups = split_by_slot(pipe);
    if pipe.is_transaction() || (groups.len() <= 1 && !groups.iter().any(|g| is_many(pipe, g))) {
        return c.req_packed_commands(pipe, offset, count).await;
    }
    let cmds: Vec<&Cmd> = pipe.cmd_iter().collect();
    let ranges = map.get(c).await.ok();
    // (the master's address, when known; its slots' command groups)
    type NodeGroups = (Option<(String, u16)>, Vec<Vec<usize>>);
    let mut by_node: Vec<NodeGroups> = Vec::new();
    for g in groups {
        let node = match (cmd_slot(cmds[g[0]]), &ranges) {
            (CmdSlot::One(s), Some(r)) => r
                .iter()
                .find(|(a, b, _, _)| (*a..=*b).contains(&s))
                .map(|(_, _, h, p)| (h.clone(), *p)),
            _ => None,
        };
        match by_node
            .iter_mut()
            .find(|(n, _)| node.is_some() && *n == node)
        {
            Some((_, gs)) => gs.push(g),
            None => by_node.push((node, vec![g])),
        }
    }
    let parts = by_node.into_iter().map(|(node, gs)| {
        let mut conn = c.clone();
        let cmds = &cmds;
        async move {
            if let Some((host, port)) = node {
                let indices: Vec<usize> = gs.iter().flatten().copied().collect();
                let mut sub = redis::pipe();
                for &i in &indices {
                    sub.add_command(cmds[i].clone());
                }
                let to = SingleNodeRoutingInfo::ByAddress { host, port };
                match conn.route_pipeline(&sub, 0, sub.len(), to).await {
                    Ok(values) => {
                        return RedisResult::Ok(indices.into_iter().zip(values).collect::<Vec<_>>())
                    }
                    Err(_) => map.forget(),
                }
            }
            let mut out = Vec::new();
            for g in gs {
                out.extend(run_group(&mut conn, cmds, g).await?);
            }
            Ok(out)
        }
    });
    let mut out: Vec<Option<Value>> = vec![None; pipe.len()];
    for part in futures_util::future::try_join_all(parts).await? {
        for (i, v) in part {
            out[i] = Some(v);
        }
    }
    Ok(out.into_iter().map(|v| v.unwrap_or(Value::Nil)).collect())
}

fn is_many(pipe: &Pipeline, g: &[usize]) -> bool {
    g.len() == 1
        && pipe
            .cmd_iter()
            .nth(g[0])
            .is_some_and(|c| cmd_slot(c) == CmdSlot::Many)
}

/// One slot's commands (routed by the cluster client), or one command whose
/// keys span slots alone.
async fn run_group(
    conn: &mut ClusterConnection,
    cmds: &[&Cmd],
    g: Vec<usize>,
) -> RedisResult<Vec<(usize, Value)>> {
    if g.len() == 1 && cmd_slot(cmds[g[0]]) == CmdSlot::Many {
        let v = conn.req_packed_command(cmds[g[0]]).await?;
        return Ok(vec![(g[0], v)]);
    }
    let mut sub = redis::pipe();
    for &i in &g {
        sub.add_command(cmds[i].clone());
    }
    let values = conn.req_packed_commands(&sub, 0, sub.len()).await?;
    Ok(g.into_iter().zip(values).collect())
}

/// The pipeline's command indices grouped by the slot of their keys, in
/// first-seen order. A command without a key joins the first group; one
/// whose keys span slots (an MGET of many users) is a group of its own,
/// which the cluster client splits itself.
pub fn split_by_slot(pipe: &Pipeline) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut by_slot: HashMap<u16, usize> = HashMap::new();
    let mut keyless = Vec::new();
    for (i, cmd) in pipe.cmd_iter().enumerate() {
        match cmd_slot(cmd) {
            CmdSlot::None => keyless.push(i),
            CmdSlot::Many => groups.push(vec![i]),
            CmdSlot::One(s) => match by_slot.get(&s) {
                Some(&g) => groups[g].push(i),
                None => {
                    by_slot.insert(s, groups.len());
                    groups.push(vec![i]);
                }
            },
        }
    }
    match groups.first_mut() {
        Some(first) => {
            first.extend(keyless);
            first.sort_unstable();
        }
        None if !keyless.is_empty() => groups.push(keyless),
        None => {}
    }
    groups
}

#[derive(Debug, PartialEq, Eq)]
enum CmdSlot {
    None,
    One(u16),
    Many,
}

/// Where a command's keys are: the key is the first argument, except for
/// scripts (after the key count) and the commands that take none.
fn cmd_slot(cmd: &Cmd) -> CmdSlot {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .map(|a| match a {
            redis::Arg::Simple(b) => b,
            redis::Arg::Cursor => &b""[..],
        })
        .collect();
    let Some(name) = args.first() else {
        return CmdSlot::None;
    };
    let name = name.to_ascii_uppercase();
    let keys: &[&[u8]] = match name.as_slice() {
        b"TIME" | b"PING" | b"INFO" | b"MULTI" | b"EXEC" | b"SCRIPT" | b"DBSIZE" | b"SCAN"
        | b"KEYS" | b"ECHO" => &[],
        b"EVAL" | b"EVALSHA" | b"FCALL" => {
            let n: usize = args
                .get(2)
                .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
                .unwrap_or(0);
            args.get(3..3 + n).unwrap_or(&[])
        }
        b"MGET" | b"DEL" | b"UNLINK" | b"EXISTS" | b"TOUCH" => &args[1..],
        _ => args.get(1..2).unwrap_or(&[]),
    };
    let mut slots = keys.iter().map(|k| key_slot(k));
    match slots.next() {
        None => CmdSlot::None,
        Some(s) if slots.all(|o| o == s) => CmdSlot::One(s),
        Some(_) => CmdSlot::Many,
    }
}

/// Every key matching `pattern` (SCAN, so no node is blocked): on a single
/// node its keyspace, on a cluster every master's.
pub async fn scan_match(conn: &mut Conn, pattern: &str) -> RedisResult<Vec<String>> {
    let mut found = Vec::new();
    match conn {
        Conn::Single(c) => {
            scan_node(&mut found, pattern, |cmd| {
                let mut c = c.clone();
                async move { cmd.query_async::<Value>(&mut c).await }
            })
            .await?
        }
        Conn::Cluster(c, _) => {
            for (host, port) in masters(c).await? {
                scan_node(&mut found, pattern, |cmd| {
                    let mut c = c.clone();
                    let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port,
                    });
                    async move { c.route_command(&cmd, to).await }
                })
                .await?;
            }
        }
    }
    Ok(found)
}

async fn scan_node<F, Fut>(found: &mut Vec<String>, pattern: &str, run: F) -> RedisResult<()>
where
    F: Fn(Cmd) -> Fut,
    Fut: std::future::Future<Output = RedisResult<Value>>,
{
    let mut cursor: u64 = 0;
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000);
        let (next, keys): (u64, Vec<String>) = redis::from_redis_value(&run(cmd).await?)?;
        found.extend(keys);
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// The masters' addresses, from `CLUSTER SLOTS` (each slot range's first node).
async fn masters(c: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let slots = c
        .route_command(
            &redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await?;
    let ranges: Vec<redis::Value> = redis::from_redis_value(&slots)?;
    let mut out: Vec<(String, u16)> = Vec::new();
    for r in ranges {
        let (host, port) = range_master(&r)?;
        if !out.contains(&(host.clone(), port)) {
            out.push((host, port));
        }
    }
    Ok(out)
}

/// The master (host, port) of one `CLUSTER SLOTS` range: `[from, to, [host,
/// port, id, ...], replicas...]`.
pub fn range_master(range: &Value) -> RedisResult<(String, u16)> {
    let items: Vec<Value> = redis::from_redis_value(range)?;
    let node: Vec<Value> = redis::from_redis_value(items.get(2).unwrap_or(&Value::Nil))?;
    let head = Value::Array(node.into_iter().take(2).collect());
    redis::from_redis_value(&head)
}

/// A pool of connections: deadpool's on a single node; on a cluster one
/// shared cluster connection (it multiplexes and reconnects per node).
#[derive(Clone)]
pub enum Pool {
    Single(deadpool_redis::Pool),
    Cluster(Arc<ClusterPool>),
}

pub struct ClusterPool {
    client: ClusterClient,
    conn: tokio::sync::Mutex<Option<Conn>>,
    timeout: Duration,
}

/// The pool's error type on both kinds (a cluster's connect error is `Backend`).
pub type PoolError = deadpool_redis::PoolError;

impl Pool {
    pub async fn get(&self) -> Result<PoolConn, PoolError> {
        match self {
            Self::Single(p) => {
                let obj = p.get().await?;
                let conn = Conn::Single(MultiplexedConnection::clone(&obj));
                Ok(PoolConn {
                    _obj: Some(obj),
                    conn,
                })
            }
            Self::Cluster(p) => {
                let mut slot = p.conn.lock().await;
                if slot.is_none() {
                    let connect = p.client.get_async_connection();
                    let c = match tokio::time::timeout(p.timeout, connect).await {
                        Ok(c) => c.map_err(deadpool_redis::PoolError::Backend)?,
                        Err(_) => {
                            return Err(deadpool_redis::PoolError::Timeout(
                                deadpool_redis::TimeoutType::Create,
                            ))
                        }
                    };
                    *slot = Some(Conn::Cluster(c, Arc::default()));
                }
                let conn = slot.clone().expect("set above");
                Ok(PoolConn { _obj: None, conn })
            }
        }
    }
}

/// A connection from the [`Pool`]; `&mut *conn` (a [`Conn`]) and `&mut conn`
/// are both `ConnectionLike`. The pooled object returns on drop.
pub struct PoolConn {
    _obj: Option<deadpool_redis::Connection>,
    conn: Conn,
}

impl std::ops::Deref for PoolConn {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl std::ops::DerefMut for PoolConn {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
}

impl ConnectionLike for PoolConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.conn.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.conn.req_packed_commands(pipe, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

/// The pool of `settings.redis` (a cluster when `redis.cluster_urls` is set).
pub fn pool(redis: &RedisSettings, material: &TlsMaterial) -> anyhow::Result<Pool> {
    let timeout = Duration::from_millis(redis.timeout_ms);
    match Client::from_settings(redis, material)? {
        Client::Cluster(client) => Ok(Pool::Cluster(Arc::new(ClusterPool {
            client,
            conn: tokio::sync::Mutex::new(None),
            timeout,
        }))),
        Client::Single(client) => {
            let manager = deadpool_redis::Manager::new(client.get_connection_info().clone())
                .map_err(|e| anyhow::anyhow!("REDIS_URL: {e}"))?;
            let config = deadpool_redis::PoolConfig {
                max_size: redis.pool_size,
                timeouts: deadpool_redis::Timeouts {
                    wait: Some(timeout),
                    create: Some(timeout),
                    recycle: Some(timeout),
                },
                ..Default::default()
            };
            let pool = deadpool_redis::Pool::builder(manager)
                .config(config)
                .runtime(deadpool_redis::Runtime::Tokio1)
                .build()
                .map_err(|e| anyhow::anyhow!("REDIS_URL: {e}"))?;
            Ok(Pool::Single(pool))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipeline_is_split_by_the_slots_of_its_keys() {
        let mut p = redis::pipe();
        p.set("a:{u1}:x", 1)
            .cmd("TIME")
            .set("a:{u2}:x", 1)
            .expire("a:{u1}:x", 5)
            .mget(&["a:{u1}:x", "a:{u2}:x"])
            .mget(&["a:{u2}:y", "a:{u2}:z"]);
        let s = |k: &str| key_slot(k.as_bytes());
        assert_ne!(s("{u1}"), s("{u2}"));
        assert_eq!(split_by_slot(&p), vec![vec![0, 1, 3], vec![2, 5], vec![4]]);
        let mut one = redis::pipe();
        one.set("{u}:a", 1).get("{u}:b").cmd("TIME");
        assert_eq!(split_by_slot(&one).len(), 1);
    }

    #[test]
    fn a_script_is_placed_by_its_first_key() {
        let mut c = redis::cmd("EVALSHA");
        c.arg("abc").arg(2).arg("p:{u1}:a").arg("p:{u1}:b").arg("x");
        assert_eq!(cmd_slot(&c), CmdSlot::One(key_slot(b"u1")));
        let mut none = redis::cmd("EVALSHA");
        none.arg("abc").arg(0).arg("x");
        assert_eq!(cmd_slot(&none), CmdSlot::None);
    }
}
