//! Reading a table a page at a time, as a stream.

use std::future::Future;

use futures_util::{StreamExt as _, TryStreamExt as _};
use sanare_core::{BoxStream, Result};

/// A stream of the items of successive pages: `fetch(cursor)` reads one page and
/// the cursor of the next (none after the last), starting from `first`. One page is
/// held at a time.
pub(crate) fn paged<C, T, F, Fut>(first: C, fetch: F) -> BoxStream<'static, Result<T>>
where
    C: Send + 'static,
    T: Send + 'static,
    F: Fn(C) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(Vec<T>, Option<C>)>> + Send + 'static,
{
    futures_util::stream::try_unfold(Some(first), move |cursor| {
        let next = cursor.map(&fetch);
        async move {
            match next {
                None => Ok(None),
                Some(page) => page.await.map(Some),
            }
        }
    })
    .map_ok(|page| futures_util::stream::iter(page.into_iter().map(Ok)))
    .try_flatten()
    .boxed()
}
