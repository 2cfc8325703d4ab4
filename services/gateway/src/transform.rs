//! Body transformations between API versions. v2 products carry
//! `price: {amount, currency}`; the catalog speaks v1 (`price` in minor
//! units and a separate `currency`), so v2 answers are rewritten on the
//! way out and v2 writes on the way in.

use serde_json::{Map, Value, json};

/// v1 → v2: every product (the object itself, or each of a page's
/// `items`) gets `price: {amount, currency}`.
pub fn price_to_object(body: &mut Value) {
    fn product(p: &mut Map<String, Value>) {
        if let (Some(Value::Number(amount)), Some(Value::String(_))) =
            (p.get("price"), p.get("currency"))
        {
            let amount = amount.clone();
            let currency = p.remove("currency").unwrap_or(Value::Null);
            p.insert(
                "price".into(),
                json!({ "amount": amount, "currency": currency }),
            );
        }
    }
    if let Value::Object(map) = body {
        match map.get_mut("items") {
            Some(Value::Array(items)) => {
                for item in items {
                    if let Value::Object(p) = item {
                        product(p);
                    }
                }
            }
            _ => product(map),
        }
    }
}

/// v2 → v1 for a written product: `price: {amount, currency}` becomes
/// `price` + `currency`. A v2 body whose price is not such an object is
/// the client's mistake, named in the error.
pub fn price_from_object(body: &mut Value) -> Result<(), String> {
    let Value::Object(map) = body else {
        return Ok(());
    };
    let Some(price) = map.get("price") else {
        return Ok(());
    };
    let Value::Object(price) = price else {
        return Err("price must be an object {amount, currency} in API v2".into());
    };
    let amount = price.get("amount").cloned();
    let currency = price.get("currency").cloned();
    let Some(amount @ Value::Number(_)) = amount else {
        return Err("price.amount must be an integer amount in minor units".into());
    };
    map.insert("price".into(), amount);
    if let Some(c) = currency {
        map.insert("currency".into(), c);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_and_pages_get_price_objects() {
        let mut p = json!({"id": "1", "price": 1299, "currency": "EUR"});
        price_to_object(&mut p);
        assert_eq!(
            p,
            json!({"id": "1", "price": {"amount": 1299, "currency": "EUR"}})
        );
        let mut page = json!({"items": [{"price": 5, "currency": "USD"}], "total": 1});
        price_to_object(&mut page);
        assert_eq!(
            page["items"][0]["price"],
            json!({"amount": 5, "currency": "USD"})
        );
        assert_eq!(page["total"], 1);
        let mut problem = json!({"title": "Not Found", "status": 404});
        price_to_object(&mut problem);
        assert_eq!(problem, json!({"title": "Not Found", "status": 404}));
    }

    #[test]
    fn v2_writes_become_v1() {
        let mut b = json!({"name": "Mug", "price": {"amount": 900, "currency": "USD"}});
        price_from_object(&mut b).unwrap();
        assert_eq!(b, json!({"name": "Mug", "price": 900, "currency": "USD"}));
        let mut bad = json!({"name": "Mug", "price": 900});
        assert!(price_from_object(&mut bad).unwrap_err().contains("object"));
        let mut bad = json!({"price": {"amount": "x"}});
        assert!(price_from_object(&mut bad).is_err());
    }
}
