// layerctl's output formatting and answer interpretation, kept apart from main() so they can be
// unit-tested without a daemon.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace layerctl {

// Exit codes, documented in --help and README.md.
enum ExitCode : int {
  kExitOk = 0,           // the call succeeded
  kExitNo = 1,           // a negative answer (exists: the layer does not exist)
  kExitUsage = 2,        // bad command line
  kExitConnect = 3,      // cannot connect to layerd's socket
  kExitDaemonError = 4,  // layerd answered with an error (Err or an HTTP error status)
  kExitIo = 5,           // the exchange failed after connecting (timeout, closed, malformed
                         // answer) or a local file could not be read or written
};

// The error text of an answer, or nullopt when it is a success: a non-empty "Err" field (with any
// status, as the plugin protocol allows), or a non-2xx status with a JSON or plain-text body.
[[nodiscard]] std::optional<std::string> answer_error(int status, std::string_view body);

// Parses a JSON answer; an empty body is an empty object. Throws std::runtime_error when the
// body is not JSON.
[[nodiscard]] nlohmann::json parse_answer(std::string_view body);

// Prometheus text exposition format to JSON: [{"name":..,"labels":{..},"value":..}, ...].
// Comment and blank lines are skipped; throws std::runtime_error on a malformed sample line.
[[nodiscard]] nlohmann::json parse_prometheus(std::string_view text);

// Human output of the plugin answers. Each returns text ending with a newline (or empty).
[[nodiscard]] std::string format_pairs(const nlohmann::json& pairs);     // Status
[[nodiscard]] std::string format_metadata(const nlohmann::json& map);    // GetMetadata
[[nodiscard]] std::string format_changes(const nlohmann::json& changes); // Changes: "A /path"
[[nodiscard]] std::string format_layers(const nlohmann::json& layers);   // /v1/layers table
[[nodiscard]] std::string format_event(const nlohmann::json& event);     // one /v1/events line
[[nodiscard]] std::string format_object(const nlohmann::json& object);   // "key: value" lines

// "1.5 MiB" style sizes and the apply progress line (no newline).
[[nodiscard]] std::string format_bytes(double bytes);
[[nodiscard]] std::string format_progress(std::uint64_t sent, std::optional<std::uint64_t> total,
                                          double seconds);

}  // namespace layerctl
