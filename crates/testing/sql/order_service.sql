-- The order-service fixture: a small but realistic OLTP schema with every kind of
-- constraint sanare validates. Installed into schema {schema}.
CREATE SCHEMA IF NOT EXISTS {schema};

CREATE TYPE {schema}.order_status AS ENUM ('pending', 'paid', 'shipped', 'delivered', 'cancelled');
CREATE TYPE {schema}.payment_method AS ENUM ('card', 'bank_transfer', 'wallet');

CREATE TABLE {schema}.customers (
    id          bigint PRIMARY KEY,
    email       varchar(120) NOT NULL UNIQUE,
    full_name   text NOT NULL,
    country     char(2) NOT NULL CHECK (country ~ '^[A-Z]{2}$'),
    profile     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {schema}.products (
    id           bigint PRIMARY KEY,
    sku          varchar(32) NOT NULL UNIQUE,
    name         text NOT NULL,
    price_cents  bigint NOT NULL CHECK (price_cents >= 0),
    attributes   jsonb NOT NULL DEFAULT '{}',
    active       boolean NOT NULL DEFAULT true
);

CREATE TABLE {schema}.orders (
    id           bigint PRIMARY KEY,
    customer_id  bigint NOT NULL REFERENCES {schema}.customers (id),
    status       {schema}.order_status NOT NULL DEFAULT 'pending',
    total_cents  bigint NOT NULL DEFAULT 0 CHECK (total_cents >= 0),
    placed_at    timestamptz NOT NULL DEFAULT now(),
    shipped_at   timestamptz,
    note         text,
    CHECK (shipped_at IS NULL OR shipped_at >= placed_at)
);
CREATE INDEX orders_customer_id_idx ON {schema}.orders (customer_id);

CREATE TABLE {schema}.order_lines (
    order_id          bigint NOT NULL REFERENCES {schema}.orders (id) ON DELETE CASCADE,
    line_no           integer NOT NULL CHECK (line_no > 0),
    product_id        bigint NOT NULL REFERENCES {schema}.products (id),
    quantity          integer NOT NULL CHECK (quantity > 0),
    unit_price_cents  bigint NOT NULL CHECK (unit_price_cents >= 0),
    amount_cents      bigint NOT NULL,
    PRIMARY KEY (order_id, line_no),
    CHECK (amount_cents = quantity * unit_price_cents)
);
CREATE INDEX order_lines_product_id_idx ON {schema}.order_lines (product_id);

CREATE TABLE {schema}.payments (
    id            bigint PRIMARY KEY,
    order_id      bigint NOT NULL REFERENCES {schema}.orders (id),
    method        {schema}.payment_method NOT NULL,
    amount_cents  numeric(12, 0) NOT NULL CHECK (amount_cents > 0),
    paid_at       timestamptz NOT NULL DEFAULT now(),
    reference     varchar(64) UNIQUE
);
CREATE INDEX payments_order_id_idx ON {schema}.payments (order_id);
