//! Incident 4, infected scanners (Cainiao 2018): malware on a depot scanner uses the device's
//! token to pull parcel after parcel and to try endpoints a scanner never needs.

use crate::cmd::demo::app::Service;
use crate::cmd::demo::data::parcel_id;
use crate::cmd::demo::identity::SCANNER_GATEWAY;
use crate::cmd::demo::phase::{Ctx, Phase};

/// The infected device (also seen in the normal traffic).
pub(crate) const DEVICE: &str = "scanner-0042";

/// Runs the phase.
pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<Phase> {
    let mut phase = Phase::new(
        "scanner",
        "Incident 4: infected scanner (Cainiao 2018)",
        "scanner-egress-lockdown.yaml",
        "malware on a depot scanner pulls parcel after parcel and tries list and customer endpoints",
    );
    phase.user(DEVICE);
    phase.show_sample = true;
    let token = ctx.issuer.device(DEVICE, "HB-07")?;
    let t = &mut phase.tally;
    let mut gateway = ctx.caller(Service::ParcelScan, SCANNER_GATEWAY.ip, Some(token));
    // Far more look-ups than the 120 a minute a scanner may make.
    for i in 0..200 {
        t.get(&mut gateway, &format!("/parcels/{}", parcel_id(i)), 1).await;
    }
    // `/parcels/search` is the app's parcel search: a list, not a waybill look-up.
    for path in [
        "/parcels",
        "/parcels/search",
        "/customers",
        "/parcels/SP20240001/history",
        "/customers/M100004/parcels",
    ] {
        t.get(&mut gateway, path, 4).await;
    }
    Ok(phase)
}
