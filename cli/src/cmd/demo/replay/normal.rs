//! Normal traffic: clerks in their own branch (and through the waybill-api still in Audit
//! mode), a support agent within limits, shoppers searching pickup points, scanners looking up
//! and scanning parcels. Every caller starts at once, within the detectors' learning period.

use crate::cmd::demo::app::Service;
use crate::cmd::demo::data::{SAMPLE_CUSTOMER, customer_id, parcel_id};
use crate::cmd::demo::identity::{ADMIN_CONSOLE, OPS_PORTAL, SCANNER_GATEWAY, STOREFRONT_BFF};
use crate::cmd::demo::phase::{Ctx, Phase, Tally};

/// Runs the phase.
pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<Phase> {
    let mut phase = Phase::new(
        "normal",
        "Normal traffic",
        "all five examples",
        "clerks read their own branch, an agent reads a few customers, shoppers search, scanners scan",
    );
    for user in ["clerk-hb07-1", "clerk-sh02-1", "agent-017", "shopper-1001", "shopper-1002", "shopper-1003"]
    {
        phase.user(user);
    }
    phase.user("scanner-0042");
    phase.user("scanner-0043");
    let (a, b, c, d, e, f) = tokio::join!(
        clerk(ctx, "clerk-hb07-1", "HB-07", 0),
        clerk(ctx, "clerk-sh02-1", "SH-02", 1),
        agent(ctx),
        shoppers(ctx),
        scanner(ctx, "scanner-0042", 0),
        scanner(ctx, "scanner-0043", 1),
    );
    for tally in [a?, b?, c?, d?, e?, f?] {
        phase.tally.merge(tally);
    }
    Ok(phase)
}

/// A clerk of `branch`; `n` is the index of the branch's first record. The clerk's first
/// request to each service comes first, so that the detectors learn it as a known caller.
async fn clerk(ctx: &Ctx<'_>, id: &str, branch: &str, n: usize) -> anyhow::Result<Tally> {
    let token = ctx.issuer.clerk(id, branch)?;
    let mut t = Tally::default();
    let mut api = ctx.caller(Service::CustomerApi, OPS_PORTAL.ip, Some(token.clone()));
    // The waybill-api runs the same rules in Audit mode: the clerk's traffic passes untouched,
    // and what would have been refused is recorded as WouldDeny (here: another branch's parcel).
    let mut waybills = ctx.caller(Service::WaybillApi, OPS_PORTAL.ip, Some(token));
    let list = format!("/parcels/search?branch={branch}&size=10");
    let waybill_list = format!("/parcels?branch={branch}&size=10");
    let (a, b) = tokio::join!(api.get(&list), waybills.get(&waybill_list));
    t.record(&a);
    t.record(&b);
    t.get(&mut api, &list, 2).await;
    t.get(&mut api, &format!("/parcels/{}", parcel_id(n)), 1).await;
    let customer = if n == 0 { SAMPLE_CUSTOMER.to_owned() } else { customer_id(n) };
    t.get(&mut api, &format!("/customers/{customer}"), 1).await;
    t.get(&mut api, &format!("/customers/{customer}/parcels"), 1).await;
    t.get(&mut waybills, &waybill_list, 1).await;
    t.get(&mut waybills, &format!("/parcels/{}", parcel_id(n + 1)), 1).await;
    Ok(t)
}

/// A support agent of the back office, well within the limits.
async fn agent(ctx: &Ctx<'_>) -> anyhow::Result<Tally> {
    let token = ctx.issuer.staff("agent-017", "support-agent", "support")?;
    let mut t = Tally::default();
    let mut console = ctx.caller(Service::MemberAdmin, ADMIN_CONSOLE.ip, Some(token));
    t.get(&mut console, "/customers?size=20", 2).await;
    t.get(&mut console, &format!("/customers/{SAMPLE_CUSTOMER}"), 1).await;
    t.get(&mut console, &format!("/customers/{}", customer_id(10)), 1).await;
    t.get(&mut console, "/customers/search?size=10", 1).await;
    Ok(t)
}

/// Three shoppers looking for a pickup point, side by side.
async fn shoppers(ctx: &Ctx<'_>) -> anyhow::Result<Tally> {
    let (a, b, c) = tokio::join!(
        shopper(ctx, "shopper-1001"),
        shopper(ctx, "shopper-1002"),
        shopper(ctx, "shopper-1003")
    );
    let mut t = a?;
    t.merge(b?);
    t.merge(c?);
    Ok(t)
}

async fn shopper(ctx: &Ctx<'_>, id: &str) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let mut bff =
        ctx.caller(Service::PickupSearch, STOREFRONT_BFF.ip, Some(ctx.issuer.shopper(id, "basic")?));
    t.get(&mut bff, "/search?city=Hangzhou&size=10", 2).await;
    t.get(&mut bff, "/points/PT501", 1).await;
    Ok(t)
}

/// A depot scanner looking up and scanning four parcels.
async fn scanner(ctx: &Ctx<'_>, device: &str, offset: usize) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let mut gateway =
        ctx.caller(Service::ParcelScan, SCANNER_GATEWAY.ip, Some(ctx.issuer.device(device, "HB-07")?));
    for i in 0..4 {
        let waybill = parcel_id(offset * 4 + i);
        t.get(&mut gateway, &format!("/parcels/{waybill}"), 1).await;
        t.post(&mut gateway, &format!("/parcels/{waybill}/scans"), r#"{"event":"sorted"}"#).await;
    }
    Ok(t)
}
