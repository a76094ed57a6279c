//! Incident 1, courier insiders (YTO Express 2020): a rented HB-07 clerk account pages through
//! every branch's parcels, reads other branches' records by id, and is tried from a workload
//! no rule names.

use crate::cmd::demo::app::Service;
use crate::cmd::demo::data::{BRANCHES, customer_id, parcel_id};
use crate::cmd::demo::identity::{BILLING, OPS_PORTAL};
use crate::cmd::demo::phase::{Ctx, Phase};

/// The rented account.
pub(crate) const ACCOUNT: &str = "clerk-hb07-2";

/// Runs the phase.
pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<Phase> {
    let mut phase = Phase::new(
        "insider",
        "Incident 1: courier insider (YTO Express 2020)",
        "courier-branch-scoping.yaml",
        "a rented HB-07 clerk account lists all branches' parcels and reads other branches' records",
    );
    phase.user(ACCOUNT);
    phase.show_sample = true;
    let token = ctx.issuer.clerk(ACCOUNT, "HB-07")?;
    let t = &mut phase.tally;
    let mut portal = ctx.caller(Service::CustomerApi, OPS_PORTAL.ip, Some(token.clone()));
    // Other branches' parcels and customers by id: each one is refused as out of scope.
    for i in (0..48).filter(|i| i % BRANCHES.len() != 0).take(12) {
        t.get(&mut portal, &format!("/parcels/{}", parcel_id(i)), 1).await;
    }
    t.get(&mut portal, &format!("/customers/{}", customer_id(1)), 1).await;
    // Every branch's parcels, page after page: three in four rows are dropped by the row
    // filter, and the account's 300 records an hour run out.
    for page in 0..34 {
        t.get(&mut portal, &format!("/parcels/search?page={page}&size=40"), 1).await;
    }
    // The same token from another workload gets nothing.
    let mut elsewhere = ctx.caller(Service::CustomerApi, BILLING.ip, Some(token));
    t.get(&mut elsewhere, "/parcels/search?size=40", 5).await;
    Ok(phase)
}
