//! The synthetic data the demo's services hold: customers, parcels and pickup points, built
//! deterministically from the example pages in `examples/data/` (every name, phone and id
//! there is made up; phone numbers generated here use the unassigned `+86 100` prefix).

use serde_json::{Value, json};

const MEMBER_PAGE: &str = include_str!("../../../../examples/data/member-export-page.json");
const PARCEL_PAGE: &str = include_str!("../../../../examples/data/parcel-page.json");
const PARCEL: &str = include_str!("../../../../examples/data/parcel.json");
const PICKUP_PAGE: &str = include_str!("../../../../examples/data/pickup-search-results.json");

/// The branches (outlets) records belong to.
pub(crate) const BRANCHES: [&str; 4] = ["HB-07", "SH-02", "BJ-11", "GZ-05"];
/// Customers of the demo.
pub(crate) const CUSTOMERS: usize = 200;
/// Parcels of the demo.
pub(crate) const PARCELS: usize = 400;
/// Pickup points of the demo.
pub(crate) const PICKUP_POINTS: usize = 400;
/// The customer whose accessors the report lists (branch HB-07).
pub(crate) const SAMPLE_CUSTOMER: &str = "M100004";

/// Every record the services serve.
pub(crate) struct Dataset {
    /// Customers in customer-api's shape plus the back-office fields.
    pub(crate) customers: Vec<Value>,
    /// Parcels in customer-api's shape.
    pub(crate) parcels: Vec<Value>,
    /// Pickup points in pickup-search's shape.
    pub(crate) pickup_points: Vec<Value>,
}

/// Id of customer `i` (0-based).
pub(crate) fn customer_id(i: usize) -> String {
    format!("M{}", 100_000 + i)
}

/// Id (waybill number) of parcel `i` (0-based).
pub(crate) fn parcel_id(i: usize) -> String {
    format!("SP2024{:04}", i + 1)
}

/// Branch of customer or parcel `i`.
pub(crate) fn branch_of(i: usize) -> &'static str {
    BRANCHES[i % BRANCHES.len()]
}

/// A clearly fake phone number for record `i` of a kind.
fn fake_phone(kind: u32, i: usize) -> String {
    format!("+86 100 {kind:02}{:02} {:04}", i / 10_000, i % 10_000)
}

fn items(page: &str) -> anyhow::Result<Vec<Value>> {
    let page: Value = serde_json::from_str(page)?;
    match page.get("items").and_then(Value::as_array) {
        Some(items) if !items.is_empty() => Ok(items.clone()),
        _ => anyhow::bail!("an example data page has no items"),
    }
}

impl Dataset {
    /// Builds the data set from the example pages.
    pub(crate) fn build() -> anyhow::Result<Dataset> {
        let members = items(MEMBER_PAGE)?;
        let customers: Vec<Value> = (0..CUSTOMERS)
            .map(|i| {
                let mut c = members[i % members.len()].clone();
                c["id"] = json!(customer_id(i));
                c["branch"] = json!(branch_of(i));
                if i >= members.len() {
                    c["phone"] = json!(fake_phone(1, i));
                }
                c
            })
            .collect();
        let template: Value = serde_json::from_str(PARCEL)?;
        let seeds = items(PARCEL_PAGE)?;
        let parcels = (0..PARCELS)
            .map(|i| {
                let sender = &customers[i % CUSTOMERS];
                let recipient = &customers[(i * 7 + 3) % CUSTOMERS];
                let seed = &seeds[i % seeds.len()];
                json!({
                    "id": parcel_id(i),
                    "branch": branch_of(i),
                    "customer": sender["id"],
                    "status": seed["status"],
                    "weightKg": template["weightKg"],
                    "sender": {"name": sender["name"], "phone": sender["phone"], "address": sender["address"]},
                    "recipient": {"name": recipient["name"], "phone": recipient["phone"], "address": recipient["address"]},
                })
            })
            .collect();
        let points = items(PICKUP_PAGE)?;
        let pickup_points = (0..PICKUP_POINTS)
            .map(|i| {
                let mut p = points[i % points.len()].clone();
                p["id"] = json!(format!("PT{}", 500 + i));
                if i >= points.len() {
                    p["contact"]["phone"] = json!(fake_phone(2, i));
                }
                p
            })
            .collect();
        Ok(Dataset { customers, parcels, pickup_points })
    }

    /// Customer-api's view of a customer (no back-office fields).
    pub(crate) fn customer(&self, id: &str) -> Option<Value> {
        let c = self.customers.iter().find(|c| c["id"] == id)?;
        Some(
            json!({"id": c["id"], "branch": c["branch"], "name": c["name"], "phone": c["phone"], "address": c["address"]}),
        )
    }

    /// The back office's view of a customer (member-admin).
    pub(crate) fn member(&self, id: &str) -> Option<Value> {
        let c = self.customers.iter().find(|c| c["id"] == id)?;
        Some(member_view(c))
    }

    /// A page of the back office's customer list (pages wrap around: the demo's 200
    /// customers stand for a much longer list).
    pub(crate) fn member_page(&self, page: usize, size: usize) -> Vec<Value> {
        self.customers.iter().cycle().skip(page * size).take(size).map(member_view).collect()
    }

    /// A parcel in customer-api's shape.
    pub(crate) fn parcel(&self, id: &str) -> Option<Value> {
        let p = self.parcels.iter().find(|p| p["id"] == id)?;
        let mut p = p.clone();
        if let Some(o) = p.as_object_mut() {
            o.remove("customer");
        }
        for party in ["sender", "recipient"] {
            if let Some(o) = p[party].as_object_mut() {
                o.remove("address");
            }
        }
        Some(p)
    }

    /// A parcel as the depot scanners' service returns it (sort code, full addresses).
    pub(crate) fn scan_view(&self, id: &str) -> Option<Value> {
        let p = self.parcels.iter().find(|p| p["id"] == id)?;
        let n = p["id"].as_str().map_or(0, |s| s.len());
        Some(json!({
            "id": p["id"],
            "sortCode": format!("{}-{}", p["branch"].as_str().unwrap_or_default(), n % 9 + 1),
            "status": p["status"],
            "weightKg": p["weightKg"],
            "sender": p["sender"],
            "recipient": p["recipient"],
        }))
    }
}

fn member_view(c: &Value) -> Value {
    json!({
        "id": c["id"], "name": c["name"], "phone": c["phone"], "idCardNumber": c["idCardNumber"],
        "address": c["address"], "tier": c["tier"],
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_data_set_is_built_from_the_examples() {
        let d = Dataset::build().unwrap();
        assert_eq!(d.customers.len(), CUSTOMERS);
        assert_eq!(d.parcels.len(), PARCELS);
        assert_eq!(d.pickup_points.len(), PICKUP_POINTS);
        let sample = d.customer(SAMPLE_CUSTOMER).unwrap();
        assert_eq!(sample["branch"], "HB-07");
        assert!(sample["phone"].as_str().is_some_and(|p| p.starts_with("+86")));
        // Generated phones beyond the example pages use the unassigned prefix.
        assert!(d.customers[150]["phone"].as_str().unwrap().starts_with("+86 100 "));
        let ids: std::collections::BTreeSet<_> = d.customers.iter().map(|c| c["id"].to_string()).collect();
        assert_eq!(ids.len(), CUSTOMERS);
        assert!(d.member(SAMPLE_CUSTOMER).unwrap().get("idCardNumber").is_some());
        assert!(d.parcel(&parcel_id(0)).unwrap()["sender"].get("address").is_none());
        assert!(d.scan_view(&parcel_id(0)).unwrap()["recipient"].get("address").is_some());
    }
}
