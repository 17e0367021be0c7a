//! The protobuf codec of pullgate's own API: prost's, except that a message that does not parse is
//! `INVALID_ARGUMENT` naming the message type, where tonic-prost answers `INTERNAL` (the caller
//! sent garbage; nothing inside pullgate failed), as the CRI socket answers a garbage
//! `PullImageRequest`. The CLI's client shares the generated code and so this codec: there a reply
//! that does not parse (only a broken daemon sends one) reads as `INVALID_ARGUMENT` too.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstEncoder};

pub struct ApiCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ApiCodec<T, U> {
    fn default() -> Self {
        ApiCodec(PhantomData)
    }
}

impl<T, U> Codec for ApiCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ApiDecoder<U>;

    fn encoder(&mut self) -> ProstEncoder<T> {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> ApiDecoder<U> {
        ApiDecoder(PhantomData)
    }
}

pub struct ApiDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for ApiDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            let name = std::any::type_name::<U>()
                .rsplit("::")
                .next()
                .unwrap_or("message");
            Status::invalid_argument(format!("{name} is not a valid protobuf message: {e}"))
        })
    }
}
