// The hostile request-target table, shared by the normaliser's tests
// (policy/tests/hostile_paths.rs) and the sidecar's end-to-end replay
// (sidecar/proxy/tests/sidecar.rs), which `include!` it.

use custos_policy::normalize::PathRejection;

/// Expected outcome of normalising one request-target.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Accepted, with this normalised path.
    Path(&'static str),
    /// Rejected with this reason.
    Reject(PathRejection),
}

use Expect::{Path, Reject};
use PathRejection::*;

/// (request-target, expected outcome).
const HOSTILE: &[(&str, Expect)] = &[
    // Dot segments, raw and encoded.
    ("/customers/../admin", Path("/admin")),
    ("/customers/%2e%2e/admin", Path("/admin")),
    ("/customers/%2E%2E/admin", Path("/admin")),
    ("/customers/.%2e/admin", Path("/admin")),
    ("/customers/./export", Path("/customers/export")),
    ("/customers/%2e/export", Path("/customers/export")),
    ("/customers/export/.", Path("/customers/export")),
    ("/customers/export/..", Path("/customers")),
    ("/customers/export/%2e", Path("/customers/export")),
    ("/a/./../b", Path("/b")),
    ("/./", Path("/")),
    ("/customers/...", Path("/customers/...")),
    ("/customers/export.", Path("/customers/export.")),
    ("/customers/export%2e", Path("/customers/export.")),
    // A format suffix (Rails' `(.:format)`): Deny rules look past it.
    ("/customers/export.json", Path("/customers/export.json")),
    ("/customers/export%2eCSV", Path("/customers/export.CSV")),
    // Climbing above the root.
    ("/..", Reject(AboveRoot)),
    ("/../customers", Reject(AboveRoot)),
    ("/%2e%2e", Reject(AboveRoot)),
    ("/a/../../b", Reject(AboveRoot)),
    ("/a/b/../../..", Reject(AboveRoot)),
    // Duplicate and trailing slashes.
    ("//customers//export/", Path("/customers/export")),
    ("/customers/export/", Path("/customers/export")),
    ("/", Path("/")),
    ("//", Path("/")),
    ("//evil.example/customers", Path("/evil.example/customers")),
    // Encoded slash.
    ("/customers%2fexport", Reject(EncodedSlash)),
    ("/customers%2Fexport", Reject(EncodedSlash)),
    ("/customers/%2e%2e%2fadmin", Reject(EncodedSlash)),
    // Backslash, raw and encoded.
    ("/customers\\export", Reject(Backslash)),
    ("/customers/%5cexport", Reject(Backslash)),
    ("/customers/%5C..%5Cadmin", Reject(Backslash)),
    ("/customers/..\\admin", Reject(Backslash)),
    // Control characters, raw and encoded.
    ("/customers/export%00", Reject(ControlCharacter)),
    ("/customers/ex%00port", Reject(ControlCharacter)),
    ("/customers/export\0", Reject(ControlCharacter)),
    ("/customers/export\t", Reject(ControlCharacter)),
    ("/customers/export%09", Reject(ControlCharacter)),
    ("/customers/export\r\n", Reject(ControlCharacter)),
    ("/customers/export%0d%0aX-Injected:%201", Reject(ControlCharacter)),
    ("/customers/export%0A", Reject(ControlCharacter)),
    ("/customers/export%7f", Reject(ControlCharacter)),
    ("/customers/export\x1b", Reject(ControlCharacter)),
    // Path parameters, raw and encoded.
    ("/customers/export;jsessionid=1", Reject(PathParameter)),
    ("/customers/export;", Reject(PathParameter)),
    ("/customers/export%3b", Reject(PathParameter)),
    ("/customers/export%3Bx", Reject(PathParameter)),
    ("/customers/..;/admin", Reject(PathParameter)),
    // Double encoding.
    ("/customers/%252e%252e/x", Reject(DoubleEncoding)),
    ("/customers/%2541", Reject(DoubleEncoding)),
    ("/customers%252fexport", Reject(DoubleEncoding)),
    ("/customers/%25%32%65", Reject(DoubleEncoding)),
    ("/customers/%2525", Reject(DoubleEncoding)),
    // A lone decoded '%' is a literal percent sign and stays escaped.
    ("/discount/50%25", Path("/discount/50%25")),
    ("/discount/50%25-off", Path("/discount/50%25-off")),
    ("/discount/%25zz", Path("/discount/%25zz")),
    // Encoded query / fragment delimiters.
    ("/customers/export%3F.json", Reject(EncodedDelimiter)),
    ("/customers/export%3f", Reject(EncodedDelimiter)),
    ("/customers/export%23", Reject(EncodedDelimiter)),
    // Invalid UTF-8 and overlong encodings.
    ("/%c0%ae%c0%ae/", Reject(InvalidUtf8)),
    ("/customers/%c0%ae%c0%ae/admin", Reject(InvalidUtf8)),
    ("/%C0%AF", Reject(InvalidUtf8)),
    ("/%e0%80%ae", Reject(InvalidUtf8)),
    ("/%ff", Reject(InvalidUtf8)),
    ("/caf%C3", Reject(InvalidUtf8)),
    ("/%ed%a0%80", Reject(InvalidUtf8)),        // UTF-16 surrogate
    ("/%c0/../customers", Reject(InvalidUtf8)), // checked before '..' drops it
    // Valid UTF-8, decoded.
    ("/caf%C3%A9", Path("/café")),
    ("/customers/%e6%97%a5", Path("/customers/日")),
    ("/%c3%a9/../x", Path("/x")),
    ("/café/%F0%9F%98%80", Path("/café/😀")),
    ("/customers/%EF%BC%8Fexport", Path("/customers/\u{FF0F}export")),
    // Letters beyond ASCII that apps folding case take for ASCII ones (Deny rules fold so):
    // long s, dotless and dotted I, the Kelvin sign.
    ("/cu%C5%BFtomers/export", Path("/cu\u{17F}tomers/export")),
    ("/%C4%B1dm%C4%B1n", Path("/\u{131}dm\u{131}n")),
    ("/%C4%B0DM%C4%B0N/users", Path("/\u{130}DM\u{130}N/users")),
    ("/customers/%E2%84%AAeys", Path("/customers/\u{212A}eys")),
    // Invalid escapes.
    ("/customers/%zz", Reject(InvalidPercentEncoding)),
    ("/customers/%4", Reject(InvalidPercentEncoding)),
    ("/customers/%", Reject(InvalidPercentEncoding)),
    ("/customers/%%32%65", Reject(InvalidPercentEncoding)),
    ("/customers/%u002e", Reject(InvalidPercentEncoding)),
    ("/customers/%+1", Reject(InvalidPercentEncoding)),
    // Plain decoding, case and whitespace are kept.
    ("/customers/exp%6frt", Path("/customers/export")),
    ("/customers/%65%78%70%6F%72%74", Path("/customers/export")),
    ("/CUSTOMERS/export", Path("/CUSTOMERS/export")),
    ("/customers/export%20", Path("/customers/export ")),
    ("/customers/+4915112345678", Path("/customers/+4915112345678")),
    // The query is split off and never interpreted.
    ("/customers/export?x=../../", Path("/customers/export")),
    ("/customers/export?%zz;\\", Path("/customers/export")),
    ("/customers/export?", Path("/customers/export")),
    ("/?a=b", Path("/")),
    // Fragments.
    ("/customers/export#x", Reject(Fragment)),
    ("/customers/export?x=1#y", Reject(Fragment)),
    ("/#", Reject(Fragment)),
    // Not origin-form.
    ("*", Reject(NotOriginForm)),
    ("http://evil/customers", Reject(NotOriginForm)),
    ("", Reject(NotOriginForm)),
    ("customers/export", Reject(NotOriginForm)),
    ("?x=1", Reject(NotOriginForm)),
    ("%2fcustomers", Reject(NotOriginForm)),
    (" /customers", Reject(NotOriginForm)),
];
