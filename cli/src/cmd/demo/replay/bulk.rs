//! Incident 2, back-office bulk download (Alipay 2010): a back-office account probes the
//! export and dump endpoints (also through path tricks), asks for oversized pages, then pages
//! through the customer list until its hourly record budget is gone.

use crate::cmd::demo::app::Service;
use crate::cmd::demo::identity::ADMIN_CONSOLE;
use crate::cmd::demo::phase::{Ctx, Phase};

/// The employee's account.
pub(crate) const ACCOUNT: &str = "agent-023";

/// Runs the phase.
pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<Phase> {
    let mut phase = Phase::new(
        "bulk",
        "Incident 2: back-office bulk download (Alipay 2010)",
        "backoffice-bulk-export.yaml",
        "a back-office account tries the export endpoints, then pages through all customers",
    );
    phase.user(ACCOUNT);
    // A request refused before identity (the encoded slash) is recorded under the peer address.
    phase.principals.insert(format!("peer:{}", ADMIN_CONSOLE.ip));
    let token = ctx.issuer.staff(ACCOUNT, "support-agent", "it-ops")?;
    let t = &mut phase.tally;
    let mut console = ctx.caller(Service::MemberAdmin, ADMIN_CONSOLE.ip, Some(token));
    for _ in 0..2 {
        for path in [
            "/customers/export",
            "/customers/export/full?format=csv",
            "/customers/./export/../export",
            "//customers//export",
            "/users/dump",
        ] {
            t.get(&mut console, path, 1).await;
        }
        t.post(&mut console, "/reports/r-2024-q4/download", "{}").await;
    }
    // An encoded slash is ambiguous: refused before any rule is looked at.
    t.get(&mut console, "/customers%2fexport", 1).await;
    // Pages over 100 records are refused (maxRecordsPerResponse 100, onExceed: Deny).
    for size in [200, 150, 500] {
        t.get(&mut console, &format!("/customers?size={size}"), 1).await;
    }
    // 100 records a page until the 500 records an hour are used up.
    for page in 0..8 {
        t.get(&mut console, &format!("/customers?page={page}&size=100"), 1).await;
    }
    Ok(phase)
}
