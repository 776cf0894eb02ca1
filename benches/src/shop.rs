//! Realistic rows for the order-service schema (`sanare_testing::fixtures::
//! order_service::DDL`): names, addresses and notes drawn from word lists into
//! natural-language variety, timestamps spread over years, skewed numerics and
//! nested jsonb, generated on the client from a seeded generator (so a run is
//! reproducible) and loaded with text `COPY`. Unlike `generate_series` rows they
//! compress and deduplicate the way production data does, not better.

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::Client;

/// A small, fast, seedable generator (SplitMix64): enough to spread bench data,
/// never for anything secret.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// A skewed number in `1..=n`: small values far more often (a rough Zipf).
    pub fn skewed(&mut self, n: u64) -> u64 {
        let u = ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64).max(1e-12);
        ((n as f64).powf(u) as u64).clamp(1, n)
    }
}

const FIRST: &[&str] = &[
    "Anna", "Ben", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kaito",
    "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Samir", "Tamar", "Ugo", "Vera",
    "Wen", "Ximena", "Yusuf", "Zoe", "Amelie", "Bruno", "Carmen", "Diego", "Emil", "Fatima",
    "Gustav", "Hanna", "Ivan", "Julia", "Karim", "Lucia", "Malik", "Nina", "Olga", "Pablo",
    "Rafael", "Sofia", "Tobias", "Uma", "Viktor", "Wanda", "Yara", "Zeno",
];
const LAST: &[&str] = &[
    "Schmidt",
    "Rossi",
    "Dubois",
    "Tanaka",
    "Silva",
    "Kowalski",
    "Nguyen",
    "Okafor",
    "Garcia",
    "Jensen",
    "Novak",
    "Haddad",
    "Murphy",
    "Ivanova",
    "Larsen",
    "Moreau",
    "Costa",
    "Fischer",
    "Yamamoto",
    "Petrov",
    "Andersson",
    "Bianchi",
    "Kaur",
    "Mendes",
    "Horvat",
    "Lindqvist",
    "Weber",
    "Fontaine",
    "Sato",
    "Oliveira",
    "Kovacs",
    "Nieminen",
    "Brennan",
    "Castro",
    "Hoffmann",
    "Ricci",
    "Lefebvre",
    "Suzuki",
    "Almeida",
    "Nowak",
];
const DOMAINS: &[&str] = &[
    "example.com",
    "mail.example.org",
    "post.example.net",
    "inbox.example.de",
    "example.fr",
];
const COUNTRIES: &[&str] = &[
    "DE", "FR", "US", "JP", "BR", "IN", "IT", "ES", "NL", "SE", "PL", "CA",
];
const CITIES: &[&str] = &[
    "Berlin", "Lyon", "Portland", "Osaka", "Recife", "Pune", "Turin", "Valencia", "Utrecht",
    "Malmo", "Krakow", "Halifax", "Hamburg", "Nantes", "Austin", "Sapporo", "Curitiba", "Kochi",
];
const STREETS: &[&str] = &[
    "Linden", "Harbor", "Mill", "Chestnut", "Station", "River", "Market", "Garden", "Hill",
    "Church", "Maple", "Bridge", "Castle", "Orchard", "Meadow", "Forest",
];
const ADJECTIVES: &[&str] = &[
    "compact",
    "sturdy",
    "light",
    "classic",
    "modern",
    "quiet",
    "bright",
    "soft",
    "waterproof",
    "foldable",
    "wireless",
    "organic",
    "recycled",
    "premium",
    "handmade",
    "slim",
    "portable",
    "vintage",
    "ergonomic",
    "insulated",
];
const NOUNS: &[&str] = &[
    "backpack",
    "kettle",
    "lamp",
    "headphones",
    "jacket",
    "mug",
    "notebook",
    "chair",
    "blanket",
    "speaker",
    "bottle",
    "umbrella",
    "keyboard",
    "pan",
    "tent",
    "watch",
    "scarf",
    "desk",
    "charger",
    "bicycle bell",
    "teapot",
    "cushion",
    "drill",
    "rug",
];
const COLORS: &[&str] = &[
    "red", "green", "blue", "black", "white", "grey", "olive", "navy", "sand",
];
const MATERIALS: &[&str] = &[
    "cotton",
    "steel",
    "oak",
    "bamboo",
    "wool",
    "aluminium",
    "glass",
    "leather",
];
const INTERESTS: &[&str] = &[
    "cooking",
    "cycling",
    "hiking",
    "music",
    "photography",
    "gaming",
    "gardening",
    "travel",
    "reading",
    "running",
    "painting",
    "camping",
];
const WORDS: &[&str] = &[
    "please",
    "leave",
    "the",
    "parcel",
    "at",
    "front",
    "door",
    "back",
    "gate",
    "with",
    "my",
    "neighbour",
    "call",
    "before",
    "delivery",
    "gift",
    "wrap",
    "it",
    "no",
    "invoice",
    "in",
    "box",
    "ring",
    "twice",
    "after",
    "six",
    "pm",
    "fragile",
    "handle",
    "care",
    "birthday",
    "present",
    "for",
    "our",
    "daughter",
    "office",
    "reception",
    "second",
    "floor",
    "deliver",
    "on",
    "monday",
    "weekend",
    "only",
    "thanks",
    "a",
    "lot",
    "if",
    "nobody",
    "is",
    "home",
    "garage",
    "side",
    "entrance",
    "dog",
    "friendly",
    "quiet",
    "street",
    "green",
    "building",
];
const METHODS: &[&str] = &["card", "bank_transfer", "wallet"];
const STATUSES: &[(&str, u64)] = &[
    ("pending", 8),
    ("paid", 12),
    ("shipped", 20),
    ("delivered", 55),
    ("cancelled", 5),
];

/// How many rows [`generate`] wrote per table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Rows of `customers`.
    pub customers: u64,
    /// Rows of `products`.
    pub products: u64,
    /// Rows of `orders`.
    pub orders: u64,
    /// Rows of `order_lines`.
    pub order_lines: u64,
    /// Rows of `payments`.
    pub payments: u64,
}

/// A sentence of `words` words from the word list, capitalised, with a full stop.
fn sentence(rng: &mut Rng, words: u64) -> String {
    let mut s = String::new();
    for i in 0..words {
        let w = rng.pick(WORDS);
        if i == 0 {
            let mut c = w.chars();
            if let Some(f) = c.next() {
                s.extend(f.to_uppercase());
                s.push_str(c.as_str());
            }
        } else {
            s.push(if rng.chance(0.08) { ',' } else { ' ' });
            if s.ends_with(',') {
                s.push(' ');
            }
            s.push_str(w);
        }
    }
    s.push('.');
    s
}

/// `2025-06-01 00:00:00+00` plus `secs`, as PostgreSQL reads a timestamptz.
fn timestamp(secs: i64) -> String {
    let base = 1_748_736_000i64; // 2025-06-01T00:00:00Z
    let t = base + secs;
    let days = t.div_euclid(86_400);
    let rem = t.rem_euclid(86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}+00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Streams text `COPY` rows built by `row(i, out)` for `i` in `0..n`.
async fn copy_rows(
    client: &Client,
    sql: &str,
    n: u64,
    mut row: impl FnMut(u64, &mut String),
) -> Result<u64, tokio_postgres::Error> {
    let sink = client.copy_in::<_, Bytes>(sql).await?;
    futures_util::pin_mut!(sink);
    let mut buf = String::with_capacity(1 << 20);
    for i in 0..n {
        row(i, &mut buf);
        if buf.len() >= 1 << 20 {
            sink.send(Bytes::from(std::mem::take(&mut buf))).await?;
        }
    }
    if !buf.is_empty() {
        sink.send(Bytes::from(buf)).await?;
    }
    sink.finish().await
}

/// Fills the empty order-service tables of `schema` (quoted) with `orders` orders
/// and their customers (one per 10 orders), products (one per 50), lines (1 to 6
/// per order) and payments (one per paid order), drawn from `seed`.
pub async fn generate(
    client: &Client,
    schema: &str,
    orders: u64,
    seed: u64,
) -> Result<Counts, tokio_postgres::Error> {
    let customers = (orders / 10).max(20);
    let products = (orders / 50).max(20);
    let mut rng = Rng::new(seed);
    let mut counts = Counts {
        customers: copy_rows(
            client,
            &format!("COPY {schema}.customers (id, email, full_name, country, profile, created_at) FROM STDIN"),
            customers,
            |i, out| customer(&mut rng, i + 1, out),
        )
        .await?,
        ..Counts::default()
    };
    let mut prices = Vec::with_capacity(products as usize);
    counts.products = copy_rows(
        client,
        &format!(
            "COPY {schema}.products (id, sku, name, price_cents, attributes, active) FROM STDIN"
        ),
        products,
        |i, out| prices.push(product(&mut rng, i + 1, out)),
    )
    .await?;
    // Orders with their lines and payments, each table streamed on its own pass
    // over the same generator state per order.
    let mut plan = Vec::with_capacity(orders as usize);
    let mut clock = 0i64;
    for id in 1..=orders {
        clock += 20 + rng.below(60) as i64;
        let lines: Vec<(u64, u64)> = (0..1 + rng.skewed(6))
            .map(|_| (rng.skewed(products), 1 + rng.skewed(5)))
            .collect();
        let total: u64 = lines
            .iter()
            .map(|&(p, q)| q * prices[(p - 1) as usize])
            .sum();
        let weights: u64 = STATUSES.iter().map(|s| s.1).sum();
        let mut w = rng.below(weights);
        let status = STATUSES
            .iter()
            .find(|s| {
                let hit = w < s.1;
                w = w.saturating_sub(s.1);
                hit
            })
            .map_or("pending", |s| s.0);
        plan.push(OrderPlan {
            id,
            customer: rng.skewed(customers),
            status,
            placed: clock,
            ship_after: 3_600 * (6 + rng.below(90) as i64),
            note: if rng.chance(0.3) {
                let words = 3 + rng.below(18);
                Some(sentence(&mut rng, words))
            } else {
                None
            },
            lines,
            total,
            pay_after: 30 + rng.below(3_000) as i64,
            method: rng.pick::<&str>(METHODS),
            reference: format!("{:016x}", rng.next_u64()),
        });
    }
    counts.orders = copy_rows(
        client,
        &format!("COPY {schema}.orders (id, customer_id, status, total_cents, placed_at, shipped_at, note) FROM STDIN"),
        orders,
        |i, out| plan[i as usize].order_row(out),
    )
    .await?;
    let line_rows: Vec<(usize, usize)> = plan
        .iter()
        .enumerate()
        .flat_map(|(o, p)| (0..p.lines.len()).map(move |l| (o, l)))
        .collect();
    counts.order_lines = copy_rows(
        client,
        &format!("COPY {schema}.order_lines (order_id, line_no, product_id, quantity, unit_price_cents, amount_cents) FROM STDIN"),
        line_rows.len() as u64,
        |i, out| {
            let (o, l) = line_rows[i as usize];
            let (p, q) = plan[o].lines[l];
            let price = prices[(p - 1) as usize];
            out.push_str(&format!("{}\t{}\t{p}\t{q}\t{price}\t{}\n", plan[o].id, l + 1, q * price));
        },
    )
    .await?;
    let paid: Vec<&OrderPlan> = plan
        .iter()
        .filter(|p| matches!(p.status, "paid" | "shipped" | "delivered") && p.total > 0)
        .collect();
    counts.payments = copy_rows(
        client,
        &format!("COPY {schema}.payments (id, order_id, method, amount_cents, paid_at, reference) FROM STDIN"),
        paid.len() as u64,
        |i, out| {
            let p = paid[i as usize];
            out.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\tPAY-{}\n",
                p.id,
                p.id,
                p.method,
                p.total,
                timestamp(p.placed + p.pay_after),
                p.reference
            ));
        },
    )
    .await?;
    Ok(counts)
}

struct OrderPlan {
    id: u64,
    customer: u64,
    status: &'static str,
    placed: i64,
    ship_after: i64,
    note: Option<String>,
    lines: Vec<(u64, u64)>,
    total: u64,
    pay_after: i64,
    method: &'static str,
    reference: String,
}

impl OrderPlan {
    fn order_row(&self, out: &mut String) {
        let shipped = if matches!(self.status, "shipped" | "delivered") {
            timestamp(self.placed + self.ship_after)
        } else {
            "\\N".to_owned()
        };
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{shipped}\t{}\n",
            self.id,
            self.customer,
            self.status,
            self.total,
            timestamp(self.placed),
            self.note.as_deref().unwrap_or("\\N")
        ));
    }
}

fn customer(rng: &mut Rng, id: u64, out: &mut String) {
    let (first, last) = (rng.pick(FIRST), rng.pick(LAST));
    let email = format!(
        "{}.{}.{id}@{}",
        first.to_lowercase(),
        last.to_lowercase(),
        rng.pick(DOMAINS)
    );
    let interests: Vec<String> = (0..rng.below(4))
        .map(|_| format!("\"{}\"", rng.pick(INTERESTS)))
        .collect();
    let profile = format!(
        r#"{{"tier": "{}", "newsletter": {}, "language": "{}", "interests": [{}], "address": {{"street": "{} {} Street", "city": "{}", "zip": "{:05}"}}}}"#,
        rng.pick(&["basic", "basic", "basic", "gold", "platinum"]),
        rng.chance(0.4),
        rng.pick(&["de", "en", "fr", "ja", "pt", "it", "es"]),
        interests.join(", "),
        1 + rng.below(240),
        rng.pick(STREETS),
        rng.pick(CITIES),
        rng.below(99_999)
    );
    let created = -(rng.below(3 * 365 * 86_400) as i64);
    out.push_str(&format!(
        "{id}\t{email}\t{first} {last}\t{}\t{profile}\t{}\n",
        rng.pick(COUNTRIES),
        timestamp(created)
    ));
}

/// Writes a product row; returns its price in cents.
fn product(rng: &mut Rng, id: u64, out: &mut String) -> u64 {
    let price = 199 + rng.skewed(50_000) * 7 + rng.below(100);
    let name = format!(
        "{} {} {}",
        rng.pick(ADJECTIVES),
        rng.pick(COLORS),
        rng.pick(NOUNS)
    );
    let attributes = format!(
        r#"{{"color": "{}", "material": "{}", "weight_g": {}, "dimensions_cm": [{}, {}, {}], "rating": {}.{}}}"#,
        rng.pick(COLORS),
        rng.pick(MATERIALS),
        50 + rng.skewed(5_000),
        5 + rng.below(80),
        5 + rng.below(60),
        1 + rng.below(40),
        1 + rng.below(5),
        rng.below(10)
    );
    out.push_str(&format!(
        "{id}\tSKU-{id:06}-{:04X}\t{name}\t{price}\t{attributes}\t{}\n",
        rng.below(1 << 16),
        if rng.chance(0.94) { "t" } else { "f" }
    ));
    price
}

/// Updates `percent` % of the rows of every order-service table of `schema`,
/// chosen uniformly at random with `seed`: a customer's profile, a product's
/// price, an order's status and note, a line's quantity (and amount), a payment's
/// time. Returns the rows updated.
pub async fn spread_update(
    client: &Client,
    schema: &str,
    percent: f64,
    seed: u64,
) -> Result<u64, tokio_postgres::Error> {
    let mut rng = Rng::new(seed);
    let mut updated = 0;
    for (table, key, set) in [
        (
            "customers",
            "id",
            "profile = jsonb_set(profile, '{tier}', '\"gold\"')",
        ),
        ("products", "id", "price_cents = price_cents + 100"),
        (
            "orders",
            "id",
            "note = coalesce(note, 'Updated') || ' Please call first.'",
        ),
        ("payments", "id", "paid_at = paid_at + interval '1 minute'"),
    ] {
        let ids: Vec<i64> = client
            .query(&format!("SELECT {key} FROM {schema}.{table}"), &[])
            .await?
            .iter()
            .map(|r| r.get::<_, i64>(0))
            .filter(|_| rng.chance(percent / 100.0))
            .collect();
        updated += client
            .execute(
                &format!("UPDATE {schema}.{table} SET {set} WHERE {key} = ANY($1)"),
                &[&ids],
            )
            .await?;
    }
    let keys: Vec<(i64, i32)> = client
        .query(
            &format!("SELECT order_id, line_no FROM {schema}.order_lines"),
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, i32>(1)))
        .filter(|_| rng.chance(percent / 100.0))
        .collect();
    let (orders, lines): (Vec<i64>, Vec<i32>) = keys.into_iter().unzip();
    updated += client
        .execute(
            &format!(
                "UPDATE {schema}.order_lines l
                    SET quantity = l.quantity + 1, amount_cents = (l.quantity + 1) * l.unit_price_cents
                   FROM unnest($1::bigint[], $2::int[]) k(o, n)
                  WHERE l.order_id = k.o AND l.line_no = k.n"
            ),
            &[&orders, &lines],
        )
        .await?;
    Ok(updated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_civil_dates() {
        assert_eq!(timestamp(0), "2025-06-01 00:00:00+00");
        assert_eq!(timestamp(86_400 * 213 + 3_661), "2025-12-31 01:01:01+00");
        assert_eq!(timestamp(-86_400), "2025-05-31 00:00:00+00");
        assert_eq!(timestamp(86_400 * 274), "2026-03-02 00:00:00+00");
    }

    #[test]
    fn the_generator_is_seeded_and_spread() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<u64> = (0..1000).map(|_| a.below(100)).collect();
        let ys: Vec<u64> = (0..1000).map(|_| b.below(100)).collect();
        assert_eq!(xs, ys);
        let distinct: std::collections::BTreeSet<u64> = xs.into_iter().collect();
        assert!(distinct.len() > 90);
        let small = (0..1000).filter(|_| a.skewed(1000) <= 10).count();
        assert!(small > 200, "{small}: skewed toward small values");
        let mut r = Rng::new(1);
        let s = sentence(&mut r, 8);
        assert!(
            s.ends_with('.') && s.chars().next().is_some_and(char::is_uppercase),
            "{s}"
        );
    }
}
