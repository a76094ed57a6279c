//! Incident 3, crawler (Taobao 2020): anonymous scraping of the pickup-point search from the
//! internet, then a signed-in crawler account scraping through the storefront at full speed.

use crate::cmd::demo::app::Service;
use crate::cmd::demo::identity::{INTERNET, STOREFRONT_BFF};
use crate::cmd::demo::phase::{Ctx, Phase};

/// The crawler's customer account.
pub(crate) const ACCOUNT: &str = "shopper-7781";

/// Runs the phase.
pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<Phase> {
    let mut phase = Phase::new(
        "crawler",
        "Incident 3: crawler (Taobao 2020)",
        "storefront-crawler-quotas.yaml",
        "anonymous scraping from outside, then a signed-in account scraping as fast as it can",
    );
    phase.principals.insert(format!("peer:{INTERNET}"));
    phase.user(ACCOUNT);
    phase.show_sample = true;
    let t = &mut phase.tally;
    let mut anonymous = ctx.caller(Service::PickupSearch, INTERNET, None);
    for page in 0..60 {
        t.get(&mut anonymous, &format!("/search?city=Hangzhou&page={page}"), 1).await;
    }
    let token = ctx.issuer.shopper(ACCOUNT, "basic")?;
    let mut signed_in = ctx.caller(Service::PickupSearch, STOREFRONT_BFF.ip, Some(token));
    for page in 0..50 {
        t.get(&mut signed_in, &format!("/search?city=Hangzhou&page={page}&size=40"), 1).await;
    }
    Ok(phase)
}
