//! The order service: `order.placed` journaled write-ahead, replayed exactly once.

use async_trait::async_trait;
use sanare::Sanare;
use sanare::journal::{JournalBuilder, JournalEntry, NewEntry, PgHandler};
use serde::{Deserialize, Serialize};

/// The journaled operation type.
pub const PLACE_ORDER: &str = "order.placed";

/// One placed order with its lines `(product, quantity)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaceOrder {
    /// The order's id.
    pub order_id: i64,
    /// Who ordered.
    pub customer_id: i64,
    /// `(product id, quantity)` per line.
    pub lines: Vec<(i64, i32)>,
}

impl PlaceOrder {
    /// A deterministic order number `n` above `base` (the last existing order id),
    /// for customers `1..=customers` and products `1..=products`.
    pub fn nth(base: i64, n: i64, customers: i64, products: i64) -> Self {
        let customers = customers.max(1);
        let products = products.max(1);
        Self {
            order_id: base + n,
            customer_id: 1 + n % customers,
            lines: vec![
                (1 + n % products, 1 + i32::try_from(n % 3).unwrap_or(0)),
                (1 + (n * 7) % products, 2),
            ],
        }
    }
}

/// Replays `order.placed` in the replay transaction (the effect and the entry's
/// applied mark commit together); a run of entries is applied in one statement.
#[derive(Debug, Clone, Copy)]
pub struct ApplyOrder;

#[async_trait]
impl PgHandler for ApplyOrder {
    async fn apply(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        entry: &JournalEntry,
    ) -> sanare::Result<()> {
        let order: PlaceOrder = entry.payload_as()?;
        apply_order(tx, &order)
            .await
            .map_err(|e| sanare::Error::database("applying order.placed", e, false))
    }
    /// The whole run in one statement ([`apply_orders`]).
    async fn apply_batch(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        entries: &[&JournalEntry],
    ) -> sanare::Result<()> {
        let orders = entries
            .iter()
            .map(|e| e.payload_as::<PlaceOrder>())
            .collect::<sanare::Result<Vec<_>>>()?;
        apply_orders(tx, &orders)
            .await
            .map_err(|e| sanare::Error::database("applying a run of order.placed", e, false))
    }
}

/// Registers the order service's replay handler on a journal builder
/// (`Sanare::builder().journal(orders::register)`).
pub fn register(journal: JournalBuilder) -> JournalBuilder {
    journal.pg_handler(PLACE_ORDER, ApplyOrder)
}

/// Applies an order; an order already present is left alone (idempotent).
pub async fn apply_order(
    tx: &impl tokio_postgres::GenericClient,
    order: &PlaceOrder,
) -> Result<(), tokio_postgres::Error> {
    let inserted = tx
        .execute(
            "INSERT INTO shop.orders (id, customer_id, status, total_cents)
             VALUES ($1, $2, 'pending', 0) ON CONFLICT (id) DO NOTHING",
            &[&order.order_id, &order.customer_id],
        )
        .await?;
    if inserted == 0 {
        return Ok(());
    }
    for (n, (product, qty)) in order.lines.iter().enumerate() {
        let line_no = i32::try_from(n + 1).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO shop.order_lines (order_id, line_no, product_id, quantity, unit_price_cents, amount_cents)
             SELECT $1, $2, p.id, $4::int, p.price_cents, $4::int * p.price_cents FROM shop.products p WHERE p.id = $3",
            &[&order.order_id, &line_no, product, qty],
        )
        .await?;
    }
    tx.execute(
        "UPDATE shop.orders SET total_cents = (SELECT coalesce(sum(amount_cents), 0)
           FROM shop.order_lines WHERE order_id = $1) WHERE id = $1",
        &[&order.order_id],
    )
    .await?;
    Ok(())
}

/// Applies many orders in one statement; orders already present are left alone
/// (the first of two entries for the same order wins, as applied one by one).
///
/// The orders, with their totals computed from the products' prices, and the
/// lines of the orders that were actually inserted go in through data-modifying
/// CTEs: one round trip and one version of each order row (no follow-up
/// `UPDATE` of the totals). The lines' foreign keys are checked at the end of the
/// statement, when the orders inserted by it are visible.
pub async fn apply_orders(
    tx: &impl tokio_postgres::GenericClient,
    orders: &[PlaceOrder],
) -> Result<(), tokio_postgres::Error> {
    let mut seen = std::collections::HashSet::with_capacity(orders.len());
    let (mut ids, mut customers) = (Vec::new(), Vec::new());
    let (mut line_orders, mut line_nos, mut products, mut quantities) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for order in orders {
        if !seen.insert(order.order_id) {
            continue;
        }
        ids.push(order.order_id);
        customers.push(order.customer_id);
        for (n, (product, qty)) in order.lines.iter().enumerate() {
            line_orders.push(order.order_id);
            line_nos.push(i32::try_from(n + 1).unwrap_or(i32::MAX));
            products.push(*product);
            quantities.push(*qty);
        }
    }
    if ids.is_empty() {
        return Ok(());
    }
    tx.execute(
        "WITH l AS (
             SELECT t.order_id, t.line_no, p.id AS product_id, t.quantity, p.price_cents,
                    t.quantity * p.price_cents AS amount_cents
               FROM unnest($3::bigint[], $4::int[], $5::bigint[], $6::int[])
                    AS t(order_id, line_no, product_id, quantity)
               JOIN shop.products p ON p.id = t.product_id
         ), totals AS (
             SELECT order_id, sum(amount_cents) AS total FROM l GROUP BY order_id
         ), o AS (
             INSERT INTO shop.orders (id, customer_id, status, total_cents)
             SELECT t.id, t.customer_id, 'pending', coalesce(s.total, 0)
               FROM unnest($1::bigint[], $2::bigint[]) AS t(id, customer_id)
               LEFT JOIN totals s ON s.order_id = t.id
             ON CONFLICT (id) DO NOTHING RETURNING id
         )
         INSERT INTO shop.order_lines (order_id, line_no, product_id, quantity, unit_price_cents, amount_cents)
         SELECT l.order_id, l.line_no, l.product_id, l.quantity, l.price_cents, l.amount_cents
           FROM l JOIN o ON o.id = l.order_id",
        &[
            &ids,
            &customers,
            &line_orders,
            &line_nos,
            &products,
            &quantities,
        ],
    )
    .await?;
    Ok(())
}

/// Places an order the sanare way: the journal entry is durable first, then the
/// change commits. A crash in between is healed by replay at the next start.
pub async fn place_order(sanare: &Sanare, order: &PlaceOrder) -> anyhow::Result<()> {
    sanare
        .journal()
        .record(
            NewEntry::new(PLACE_ORDER, order)?
                .idempotency_key(format!("order-{}", order.order_id))
                .source_system("order-service"),
        )
        .await?;
    let mut client = sanare_pg::get_conn(sanare.pool()).await?;
    let tx = client.transaction().await?;
    apply_order(&*tx, order).await?;
    tx.commit().await?;
    Ok(())
}

/// A row-for-row hash of the order tables (rows in key order, text form), to
/// compare a recovered database with the committed work.
pub async fn tables_hash(client: &impl tokio_postgres::GenericClient) -> anyhow::Result<String> {
    let mut all = String::new();
    for table in ["customers", "products", "orders", "order_lines", "payments"] {
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*)::text || ':' || coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '')
                       FROM shop.{table} x"
                ),
                &[],
            )
            .await?;
        let part: String = row.get(0);
        all.push_str(table);
        all.push('=');
        all.push_str(&part);
        all.push(';');
    }
    Ok(all)
}
