//! Order rules: at least one line, positive quantities, non-negative prices,
//! and a total that cannot overflow.

use bazaar_contracts::CreateOrder;

/// Why an order request was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Invalid {
    #[error("an order needs at least one item")]
    Empty,
    #[error("quantities must be positive")]
    Quantity,
    #[error("prices must not be negative")]
    Price,
    #[error("the order total is too large")]
    Overflow,
}

/// The total in minor units, checked.
pub fn total(cmd: &CreateOrder) -> Result<i64, Invalid> {
    if cmd.items.is_empty() {
        return Err(Invalid::Empty);
    }
    cmd.items.iter().try_fold(0i64, |acc, item| {
        if item.quantity <= 0 {
            return Err(Invalid::Quantity);
        }
        if item.unit_price < 0 {
            return Err(Invalid::Price);
        }
        item.unit_price
            .checked_mul(item.quantity)
            .and_then(|line| acc.checked_add(line))
            .ok_or(Invalid::Overflow)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bazaar_contracts::OrderItem;

    fn cmd(lines: &[(i64, i64)]) -> CreateOrder {
        CreateOrder {
            user_id: "u".into(),
            user_email: "u@x.io".into(),
            currency: "USD".into(),
            items: lines
                .iter()
                .map(|&(unit_price, quantity)| OrderItem {
                    product_id: "p".into(),
                    name: "n".into(),
                    unit_price,
                    quantity,
                })
                .collect(),
        }
    }

    #[test]
    fn totals_in_minor_units() {
        assert_eq!(total(&cmd(&[(1299, 2), (1, 1)])), Ok(2599));
        assert_eq!(total(&cmd(&[])), Err(Invalid::Empty));
        assert_eq!(total(&cmd(&[(10, 0)])), Err(Invalid::Quantity));
        assert_eq!(total(&cmd(&[(-1, 1)])), Err(Invalid::Price));
        assert_eq!(total(&cmd(&[(i64::MAX, 2)])), Err(Invalid::Overflow));
    }
}
