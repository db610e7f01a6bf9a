//! Reading JSON bodies exactly as their schemas describe them. Derived `Deserialize` impls
//! also take a struct from a JSON array (fields by position), and serde's integers refuse
//! `300.0`, which JSON Schema's `integer` admits; these helpers close both gaps.

use super::error::ApiError;
use axum::extract::rejection::JsonRejection;
use axum::Json;
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::marker::PhantomData;

/// A JSON body that must be an object.
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(ObjectVisitor(PhantomData)).map(Object)
    }
}

/// The body of a JSON operation, or the error its rejection maps to.
pub fn body<T: DeserializeOwned>(
    body: Result<Json<Object<T>>, JsonRejection>,
) -> Result<T, ApiError> {
    Ok(body?.0 .0)
}

/// A JSON number with no fractional part, however it is written (`300`, `300.0`, `3e2`).
/// Range checks are the caller's; values far out of any range saturate, so they still fail them.
pub fn whole_number<'de, D: Deserializer<'de>>(d: D) -> Result<i128, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    if let Some(i) = n.as_i64() {
        return Ok(i.into());
    }
    if let Some(u) = n.as_u64() {
        return Ok(u.into());
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 => Ok(f as i128),
        _ => Err(serde::de::Error::custom(format!(
            "{n} is not a whole number"
        ))),
    }
}

/// [`whole_number`], or `null`.
pub fn optional_whole_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i128>, D::Error> {
    #[derive(Deserialize)]
    struct Whole(#[serde(deserialize_with = "whole_number")] i128);
    Ok(Option::<Whole>::deserialize(d)?.map(|w| w.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Body {
        name: String,
        #[serde(default, deserialize_with = "optional_whole_number")]
        n: Option<i128>,
    }

    fn parse(text: &str) -> Result<Body, serde_json::Error> {
        serde_json::from_str::<Object<Body>>(text).map(|o| o.0)
    }

    #[test]
    fn only_objects_are_bodies() {
        assert_eq!(
            parse(r#"{"name": "a"}"#).unwrap(),
            Body {
                name: "a".into(),
                n: None
            }
        );
        for bad in [r#"["a"]"#, r#"["a", 1]"#, r#""a""#, "null", "1"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("a JSON object"), "{bad}: {e}");
        }
        assert!(
            parse(r#"{"name": "a", "x": 1}"#).is_err(),
            "unknown fields still refused"
        );
    }

    #[test]
    fn whole_numbers_in_any_spelling() {
        for (text, want) in [
            ("300", 300),
            ("300.0", 300),
            ("3e2", 300),
            ("-1", -1),
            ("18446744073709551615", u64::MAX as i128),
            ("1e40", i128::MAX),
        ] {
            let b = parse(&format!(r#"{{"name": "a", "n": {text}}}"#)).unwrap();
            assert_eq!(b.n, Some(want), "{text}");
        }
        assert_eq!(parse(r#"{"name": "a", "n": null}"#).unwrap().n, None);
        for bad in ["300.5", "\"300\"", "true"] {
            assert!(
                parse(&format!(r#"{{"name": "a", "n": {bad}}}"#)).is_err(),
                "{bad}"
            );
        }
    }
}
