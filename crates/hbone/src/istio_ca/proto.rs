//! The messages of Istio's certificate service (`proto/istio/ca.proto`),
//! written out with prost's derive rather than generated, so building hbone
//! needs no protobuf compiler. The tests below pin each field's wire
//! encoding to the numbers in the proto file.

/// gRPC path of the one method hbone calls.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded PKCS#10 certificate request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested validity in seconds; the CA may shorten it.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Opaque metadata; hbone sends none.
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates, the leaf first and the root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Each field's key byte is `(number << 3) | wire type`: csr is field 1
    /// length-delimited (0x0a), validity_duration field 3 varint (0x18),
    /// metadata field 4 length-delimited (0x22).
    #[test]
    fn request_fields_carry_the_numbers_of_the_proto() {
        let request = IstioCertificateRequest {
            csr: "ab".into(),
            validity_duration: 300,
            metadata: Some(prost_types::Struct::default()),
        };
        assert_eq!(
            request.encode_to_vec(),
            [0x0a, 2, b'a', b'b', 0x18, 0xac, 0x02, 0x22, 0]
        );
    }

    #[test]
    fn response_chain_is_field_one_repeated() {
        let bytes = [0x0a, 1, b'x', 0x0a, 2, b'y', b'z'];
        let response = IstioCertificateResponse::decode(&bytes[..]).unwrap();
        assert_eq!(response.cert_chain, ["x", "yz"]);
    }
}
