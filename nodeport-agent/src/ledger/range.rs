//! The node port range (`kube-apiserver --service-node-port-range`) and its KEP-3668 bands.

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

/// A `--service-node-port-range` value, both ends inclusive.
///
/// Parsed like kube-apiserver parses it (`k8s.io/apimachinery/pkg/util/net.ParsePortRange`):
/// `"N-M"` (N..=M), `"N+K"` (N..=N+K, so K+1 ports) or a single `"N"` (one port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodePortRange {
    pub first: u16,
    pub last: u16,
}

/// Why a `--service-node-port-range` (or `--local-port-range A-B`) value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("empty port range: expected N-M, N+K or N")]
    Empty,
    #[error("{value:?}: {part:?} is not a port number")]
    NotANumber { value: String, part: String },
    #[error("{value:?}: use one of N-M, N+K or N, not both '-' and '+'")]
    Malformed { value: String },
    #[error("{value:?}: the port range cannot be greater than 65535")]
    TooLarge { value: String },
    #[error("{value:?}: end port cannot be less than start port")]
    Reversed { value: String },
    #[error("{value:?}: port 0 cannot be a node port")]
    IncludesZero { value: String },
}

impl NodePortRange {
    /// kube-apiserver's default range.
    pub const DEFAULT: NodePortRange = NodePortRange {
        first: 30000,
        last: 32767,
    };

    pub fn new(first: u16, last: u16) -> Result<Self, RangeError> {
        let value = format!("{first}-{last}");
        if last < first {
            return Err(RangeError::Reversed { value });
        }
        if first == 0 {
            return Err(RangeError::IncludesZero { value });
        }
        Ok(Self { first, last })
    }

    /// Number of ports in the range.
    pub fn size(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// KEP-3668 offset: how many of the lowest ports form the static band.
    ///
    /// `min(max(16, size/32), 128)`, except that kube-apiserver does not split ranges of 16
    /// ports or fewer at all (`calculateRangeOffset` in pkg/registry/core/service/portallocator
    /// returns 0 when `size <= 16`): automatic allocation then draws from the whole range.
    pub fn band_offset(&self) -> u32 {
        const MIN: u32 = 16;
        const MAX: u32 = 128;
        const STEP: u32 = 32;
        let size = self.size();
        if size <= MIN {
            return 0;
        }
        (size / STEP).clamp(MIN, MAX)
    }

    /// The lowest `band_offset()` ports, where manually chosen node ports belong: automatic
    /// allocation only takes them once the dynamic band is full. `None` when the range is too
    /// small to be split (16 ports or fewer).
    pub fn static_band(&self) -> Option<RangeInclusive<u16>> {
        let offset = self.band_offset();
        // offset < size, so the arithmetic stays within first..=last.
        (offset > 0).then(|| self.first..=self.first + (offset - 1) as u16)
    }

    /// The ports automatic allocation prefers. Always non-empty: the offset is smaller than
    /// the range, and a range that is not split is all dynamic.
    pub fn dynamic_band(&self) -> RangeInclusive<u16> {
        self.first + self.band_offset() as u16..=self.last
    }

    /// Which band `port` sits in, `None` when it is outside the range.
    pub fn band_of(&self, port: u16) -> Option<BandName> {
        if !self.contains(port) {
            None
        } else if self.static_band().is_some_and(|band| band.contains(&port)) {
            Some(BandName::Static)
        } else {
            Some(BandName::Dynamic)
        }
    }
}

impl Default for NodePortRange {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The two KEP-3668 bands of the range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BandName {
    Static,
    Dynamic,
}

impl BandName {
    pub fn as_str(self) -> &'static str {
        match self {
            BandName::Static => "static",
            BandName::Dynamic => "dynamic",
        }
    }
}

impl fmt::Display for NodePortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for NodePortRange {
    type Err = RangeError;

    fn from_str(value: &str) -> Result<Self, RangeError> {
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(RangeError::Empty);
        }
        let number = |part: &str| -> Result<u64, RangeError> {
            // Go's strconv.Atoi would accept a sign; a port never has one.
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(RangeError::NotANumber {
                    value: trimmed.to_owned(),
                    part: part.to_owned(),
                });
            }
            // Saturate: anything this long is above 65535 anyway.
            Ok(part.parse::<u64>().unwrap_or(u64::MAX))
        };
        let (low, high) = match (trimmed.find('-'), trimmed.find('+')) {
            (None, None) => {
                let port = number(trimmed)?;
                (port, port)
            }
            (Some(hyphen), None) => (number(&trimmed[..hyphen])?, number(&trimmed[hyphen + 1..])?),
            (None, Some(plus)) => {
                let low = number(&trimmed[..plus])?;
                (low, low.saturating_add(number(&trimmed[plus + 1..])?))
            }
            (Some(_), Some(_)) => {
                return Err(RangeError::Malformed {
                    value: trimmed.to_owned(),
                });
            }
        };
        let too_large = || RangeError::TooLarge {
            value: trimmed.to_owned(),
        };
        let low = u16::try_from(low).map_err(|_| too_large())?;
        let high = u16::try_from(high).map_err(|_| too_large())?;
        if high < low {
            return Err(RangeError::Reversed {
                value: trimmed.to_owned(),
            });
        }
        if low == 0 {
            return Err(RangeError::IncludesZero {
                value: trimmed.to_owned(),
            });
        }
        Ok(Self {
            first: low,
            last: high,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> NodePortRange {
        value.parse().unwrap_or_else(|err| panic!("{value}: {err}"))
    }

    #[test]
    fn parses_kube_apiserver_syntaxes() {
        assert_eq!(
            parse("30000-32767"),
            NodePortRange::new(30000, 32767).unwrap()
        );
        // N+K means N..=N+K (ParsePortRange: high = low + offset, size = 1 + high - low).
        assert_eq!(
            parse("30000+2767"),
            NodePortRange::new(30000, 32767).unwrap()
        );
        assert_eq!(parse("30000+2767").size(), 2768);
        assert_eq!(parse("31000"), NodePortRange::new(31000, 31000).unwrap());
        assert_eq!(
            parse(" 30000-30015 "),
            NodePortRange::new(30000, 30015).unwrap()
        );
        assert_eq!(parse("1-65535").size(), 65535);
    }

    #[test]
    fn rejects_malformed_ranges_with_a_clear_message() {
        let cases = [
            ("", "empty port range: expected N-M, N+K or N"),
            ("   ", "empty port range: expected N-M, N+K or N"),
            ("abc", "\"abc\": \"abc\" is not a port number"),
            ("30000-", "\"30000-\": \"\" is not a port number"),
            ("-5", "\"-5\": \"\" is not a port number"),
            (
                "30000 - 32767",
                "\"30000 - 32767\": \"30000 \" is not a port number",
            ),
            (
                "30000-32767+1",
                "use one of N-M, N+K or N, not both '-' and '+'",
            ),
            (
                "30000-70000",
                "\"30000-70000\": the port range cannot be greater than 65535",
            ),
            (
                "65000+1000",
                "\"65000+1000\": the port range cannot be greater than 65535",
            ),
            (
                "99999999999999999999999",
                "the port range cannot be greater than 65535",
            ),
            (
                "32767-30000",
                "\"32767-30000\": end port cannot be less than start port",
            ),
            ("0-100", "\"0-100\": port 0 cannot be a node port"),
        ];
        for (value, expected) in cases {
            let err = value.parse::<NodePortRange>().unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{value:?}: got {err:?}, want {expected:?}"
            );
        }
    }

    #[test]
    fn default_range_bands_match_kep_3668() {
        let range = NodePortRange::DEFAULT;
        assert_eq!(range.size(), 2768);
        assert_eq!(range.band_offset(), 86);
        assert_eq!(range.static_band(), Some(30000..=30085));
        assert_eq!(range.dynamic_band(), 30086..=32767);
        assert_eq!(range.band_of(30085), Some(BandName::Static));
        assert_eq!(range.band_of(30086), Some(BandName::Dynamic));
        assert_eq!(range.band_of(29999), None);
        assert_eq!(range.band_of(32768), None);
    }

    #[test]
    fn band_offset_follows_min_max_formula() {
        // (size, offset): below 512 ports the minimum 16 applies, above 4096 the maximum 128.
        let cases = [
            (17, 16),
            (100, 16),
            (511, 16),
            (512, 16),
            (544, 17),
            (2768, 86),
            (4096, 128),
            (4127, 128),
            (65535, 128),
        ];
        for (size, offset) in cases {
            let range = NodePortRange::new(1, size as u16).unwrap();
            assert_eq!(range.size(), size);
            assert_eq!(range.band_offset(), offset, "size {size}");
            let static_band = range.static_band().unwrap();
            assert_eq!(static_band.clone().count() as u32, offset);
            assert_eq!(*range.dynamic_band().start(), static_band.end() + 1);
        }
    }

    #[test]
    fn ranges_of_16_ports_or_fewer_are_not_split() {
        for size in [1u16, 2, 15, 16] {
            let range = NodePortRange::new(30000, 30000 + size - 1).unwrap();
            assert_eq!(range.band_offset(), 0, "size {size}");
            assert_eq!(range.static_band(), None);
            assert_eq!(range.dynamic_band(), 30000..=30000 + size - 1);
            assert_eq!(range.band_of(30000), Some(BandName::Dynamic));
        }
    }
}
