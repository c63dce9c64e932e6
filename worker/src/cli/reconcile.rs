//! `worker reconcile [--user ID]`: the reconciler of docs/architecture.md on demand,
//! printing every repair.

use common::settings::Settings;

use crate::ctx::Ctx;

/// Reconciles one user (or every user loaded in Redis) and prints the repairs.
pub async fn run(settings: Settings, user: Option<String>) -> anyhow::Result<()> {
    let ctx = Ctx::new(settings)?;
    let repairs = match user {
        Some(u) => crate::jobs::reconcile::reconcile_user(&ctx, &u)
            .await?
            .into_iter()
            .collect::<Vec<_>>(),
        None => {
            let s = crate::jobs::reconcile::reconcile_all(&ctx).await?;
            println!("checked {} user(s)", s.users);
            s.repairs
        }
    };
    for r in &repairs {
        println!("repaired {}: balance {} -> {}", r.user_id, r.from, r.to);
    }
    println!("{} repaired", repairs.len());
    Ok(())
}
