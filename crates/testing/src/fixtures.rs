//! Fixture schemas and data generators.

/// The order-service fixture: `customers`, `products`, `orders`, `order_lines` and
/// `payments`, with foreign keys, CHECK and UNIQUE constraints, enum types, JSONB,
/// varchar lengths, numeric precision and timestamps.
///
/// Data is generated server-side with `generate_series`, deterministic for a given
/// size: order `i` belongs to customer `(i % customers) + 1`, has `1 + i % 5` lines,
/// and a total equal to the sum of its lines; every order whose status is past
/// `pending` (and not `cancelled`) has one payment of its total.
pub mod order_service {
    use tokio_postgres::GenericClient;

    /// The fixture's tables, parents first.
    pub const TABLES: [&str; 5] = ["customers", "products", "orders", "order_lines", "payments"];

    /// The schema DDL, with `{schema}` where the schema name goes.
    pub const DDL: &str = include_str!("../sql/order_service.sql");

    /// How many rows [`generate`] wrote per table.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Counts {
        /// Rows in `customers`.
        pub customers: u64,
        /// Rows in `products`.
        pub products: u64,
        /// Rows in `orders`.
        pub orders: u64,
        /// Rows in `order_lines`.
        pub order_lines: u64,
        /// Rows in `payments`.
        pub payments: u64,
    }

    impl Counts {
        /// Rows in all tables.
        pub fn total(&self) -> u64 {
            self.customers + self.products + self.orders + self.order_lines + self.payments
        }
    }

    /// A row-for-row fingerprint of every fixture table in `schema`, parents first:
    /// its name, row count and the md5 of its rows' text forms in sorted order. Two
    /// states of the tables are equal exactly when their fingerprints are.
    pub async fn content_hashes(
        client: &impl GenericClient,
        schema: &str,
    ) -> Result<Vec<(String, i64, String)>, tokio_postgres::Error> {
        let s = quote(schema);
        let mut out = Vec::with_capacity(TABLES.len());
        for t in TABLES {
            let row = client
                .query_one(
                    &format!(
                        "SELECT count(*), coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '')
                           FROM {s}.{t} x"
                    ),
                    &[],
                )
                .await?;
            out.push((t.to_owned(), row.get(0), row.get(1)));
        }
        Ok(out)
    }

    /// Creates the fixture's types and tables in `schema` (created if missing).
    pub async fn install(
        client: &impl GenericClient,
        schema: &str,
    ) -> Result<(), tokio_postgres::Error> {
        client
            .batch_execute(&DDL.replace("{schema}", &quote(schema)))
            .await
    }

    /// Fills the (empty) fixture tables with `orders` orders and the customers,
    /// products, lines and payments that go with them (about 3 lines per order,
    /// one customer per 10 orders, one product per 50 orders, at least 20 of each).
    pub async fn generate(
        client: &impl GenericClient,
        schema: &str,
        orders: u64,
    ) -> Result<Counts, tokio_postgres::Error> {
        let s = quote(schema);
        let n = i64::try_from(orders).unwrap_or(i64::MAX);
        let customers = (n / 10).max(20);
        let products = (n / 50).max(20);
        client
            .execute(
                &format!(
                    "INSERT INTO {s}.customers (id, email, full_name, country, profile, created_at)
                     SELECT g, 'customer' || g || '@example.com', 'Customer ' || g,
                            (ARRAY['DE','FR','US','JP','BR','IN'])[1 + g % 6],
                            jsonb_build_object('tier', (ARRAY['basic','gold','platinum'])[1 + g % 3], 'newsletter', g % 2 = 0),
                            timestamptz '2025-01-01 00:00:00+00' + g * interval '1 minute'
                       FROM generate_series(1, $1::bigint) g"
                ),
                &[&customers],
            )
            .await?;
        client
            .execute(
                &format!(
                    "INSERT INTO {s}.products (id, sku, name, price_cents, attributes, active)
                     SELECT g, 'SKU-' || lpad(g::text, 8, '0'), 'Product ' || g, 100 + (g * 37) % 9900,
                            jsonb_build_object('color', (ARRAY['red','green','blue'])[1 + g % 3], 'weight_g', 50 + g % 950),
                            g % 17 <> 0
                       FROM generate_series(1, $1::bigint) g"
                ),
                &[&products],
            )
            .await?;
        client
            .execute(
                &format!(
                    "INSERT INTO {s}.orders (id, customer_id, status, total_cents, placed_at, shipped_at, note)
                     SELECT g, 1 + g % $2::bigint,
                            (ARRAY['pending','paid','shipped','delivered','cancelled']::{s}.order_status[])[1 + g % 5],
                            0,
                            timestamptz '2025-06-01 00:00:00+00' + g * interval '10 seconds',
                            CASE WHEN g % 5 IN (2, 3) THEN timestamptz '2025-06-01 00:00:00+00' + g * interval '10 seconds' + interval '2 days' END,
                            CASE WHEN g % 7 = 0 THEN 'gift wrap' END
                       FROM generate_series(1, $1::bigint) g"
                ),
                &[&n, &customers],
            )
            .await?;
        client
            .execute(
                &format!(
                    "INSERT INTO {s}.order_lines (order_id, line_no, product_id, quantity, unit_price_cents, amount_cents)
                     SELECT o, l, p, q, pr.price_cents, q * pr.price_cents
                       FROM generate_series(1, $1::bigint) o
                       CROSS JOIN LATERAL generate_series(1, 1 + (o % 5)::int) l
                       CROSS JOIN LATERAL (SELECT 1 + (o * 7 + l * 13) % $2::bigint AS p, 1 + ((o + l) % 4)::int AS q) x
                       JOIN {s}.products pr ON pr.id = x.p"
                ),
                &[&n, &products],
            )
            .await?;
        client
            .execute(
                &format!(
                    "UPDATE {s}.orders o SET total_cents = l.total
                       FROM (SELECT order_id, sum(amount_cents) AS total FROM {s}.order_lines GROUP BY order_id) l
                      WHERE l.order_id = o.id"
                ),
                &[],
            )
            .await?;
        client
            .execute(
                &format!(
                    "INSERT INTO {s}.payments (id, order_id, method, amount_cents, paid_at, reference)
                     SELECT o.id, o.id, (ARRAY['card','bank_transfer','wallet']::{s}.payment_method[])[1 + o.id % 3],
                            o.total_cents, o.placed_at + interval '5 minutes', 'PAY-' || o.id
                       FROM {s}.orders o
                      WHERE o.status IN ('paid', 'shipped', 'delivered') AND o.total_cents > 0"
                ),
                &[],
            )
            .await?;
        client
            .batch_execute(&format!(
                "ANALYZE {s}.customers, {s}.products, {s}.orders, {s}.order_lines, {s}.payments"
            ))
            .await?;
        let count = |table: &'static str| {
            let sql = format!("SELECT count(*) FROM {s}.{table}");
            async move {
                let row = client.query_one(&sql, &[]).await?;
                Ok::<u64, tokio_postgres::Error>(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
            }
        };
        Ok(Counts {
            customers: count("customers").await?,
            products: count("products").await?,
            orders: count("orders").await?,
            order_lines: count("order_lines").await?,
            payments: count("payments").await?,
        })
    }

    fn quote(ident: &str) -> String {
        format!("\"{}\"", ident.replace('"', "\"\""))
    }
}
