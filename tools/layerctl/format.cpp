#include "format.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <ctime>
#include <stdexcept>
#include <vector>

#include <fmt/format.h>

namespace layerctl {

using nlohmann::json;

namespace {

std::string trim(std::string_view text) {
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.front()))) {
    text.remove_prefix(1);
  }
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) {
    text.remove_suffix(1);
  }
  return std::string(text);
}

// A JSON scalar as plain text: strings without quotes, everything else as JSON.
std::string scalar_text(const json& value) {
  if (value.is_string()) return value.get<std::string>();
  if (value.is_null()) return "";
  return value.dump();
}

// The first present field among `names` (the daemon's field names may be either case).
const json* field(const json& object, std::initializer_list<const char*> names) {
  if (!object.is_object()) return nullptr;
  for (const char* name : names) {
    auto it = object.find(name);
    if (it != object.end()) return &*it;
  }
  return nullptr;
}

}  // namespace

std::optional<std::string> answer_error(int status, std::string_view body) {
  json parsed = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (parsed.is_object()) {
    auto err = parsed.find("Err");
    if (err != parsed.end() && err->is_string() && !err->get<std::string>().empty()) {
      return err->get<std::string>();
    }
    if (status < 200 || status > 299) {
      for (const char* key : {"error", "message"}) {
        auto it = parsed.find(key);
        if (it != parsed.end() && it->is_string()) return fmt::format("HTTP {}: {}", status, it->get<std::string>());
      }
    }
  }
  if (status < 200 || status > 299) {
    std::string text = trim(body);
    if (text.size() > 512) text = text.substr(0, 512) + "...";
    return text.empty() ? fmt::format("HTTP {}", status) : fmt::format("HTTP {}: {}", status, text);
  }
  return std::nullopt;
}

json parse_answer(std::string_view body) {
  if (trim(body).empty()) return json::object();
  json parsed = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) {
    std::string text = trim(body);
    if (text.size() > 200) text = text.substr(0, 200) + "...";
    throw std::runtime_error(fmt::format("the daemon's answer is not JSON: {}", text));
  }
  return parsed;
}

json parse_prometheus(std::string_view text) {
  json samples = json::array();
  std::size_t line_no = 0;
  while (!text.empty()) {
    std::size_t eol = text.find('\n');
    std::string_view line = text.substr(0, eol);
    text = eol == std::string_view::npos ? std::string_view{} : text.substr(eol + 1);
    ++line_no;
    std::string trimmed = trim(line);
    if (trimmed.empty() || trimmed.front() == '#') continue;
    std::string_view rest = trimmed;
    auto bad = [&](const char* why) {
      return std::runtime_error(fmt::format("metrics line {}: {}: {}", line_no, why, trimmed));
    };
    std::size_t name_end = 0;
    while (name_end < rest.size() && rest[name_end] != '{' && rest[name_end] != ' ' &&
           rest[name_end] != '\t') {
      ++name_end;
    }
    if (name_end == 0) throw bad("missing metric name");
    json sample;
    sample["name"] = std::string(rest.substr(0, name_end));
    json labels = json::object();
    rest.remove_prefix(name_end);
    if (!rest.empty() && rest.front() == '{') {
      rest.remove_prefix(1);
      for (;;) {
        while (!rest.empty() && (rest.front() == ' ' || rest.front() == ',')) rest.remove_prefix(1);
        if (rest.empty()) throw bad("unterminated label set");
        if (rest.front() == '}') {
          rest.remove_prefix(1);
          break;
        }
        std::size_t eq = rest.find('=');
        if (eq == std::string_view::npos || eq + 1 >= rest.size() || rest[eq + 1] != '"') {
          throw bad("malformed label");
        }
        std::string key = trim(rest.substr(0, eq));
        rest.remove_prefix(eq + 2);
        std::string value;
        bool closed = false;
        while (!rest.empty()) {
          char c = rest.front();
          rest.remove_prefix(1);
          if (c == '"') {
            closed = true;
            break;
          }
          if (c == '\\' && !rest.empty()) {
            char e = rest.front();
            rest.remove_prefix(1);
            value += e == 'n' ? '\n' : e;
            continue;
          }
          value += c;
        }
        if (!closed) throw bad("unterminated label value");
        labels[key] = value;
      }
    }
    sample["labels"] = labels;
    std::string value_text = trim(rest);
    // An optional timestamp may follow the value.
    std::size_t space = value_text.find_first_of(" \t");
    if (space != std::string::npos) value_text.resize(space);
    if (value_text.empty()) throw bad("missing value");
    char* end = nullptr;
    double value = std::strtod(value_text.c_str(), &end);
    if (end == value_text.c_str() || *end != '\0') throw bad("value is not a number");
    if (std::isfinite(value)) {
      sample["value"] = value;
    } else {
      // JSON has no infinities: keep them as Prometheus writes them ("+Inf").
      sample["value"] = value_text;
    }
    samples.push_back(std::move(sample));
  }
  return samples;
}

std::string format_pairs(const json& pairs) {
  std::vector<std::pair<std::string, std::string>> rows;
  if (pairs.is_array()) {
    for (const auto& pair : pairs) {
      if (pair.is_array() && pair.size() >= 2) {
        rows.emplace_back(scalar_text(pair[0]), scalar_text(pair[1]));
      }
    }
  } else if (pairs.is_object()) {
    for (const auto& [key, value] : pairs.items()) rows.emplace_back(key, scalar_text(value));
  }
  std::size_t width = 0;
  for (const auto& row : rows) width = std::max(width, row.first.size());
  std::string out;
  for (const auto& [key, value] : rows) {
    out += fmt::format("{:<{}}  {}\n", key + ":", width + 1, value);
  }
  return out;
}

std::string format_metadata(const json& map) { return format_pairs(map); }

std::string format_object(const json& object) {
  if (!object.is_object()) return object.dump() + "\n";
  return format_pairs(object);
}

std::string format_changes(const json& changes) {
  std::string out;
  if (!changes.is_array()) return out;
  for (const auto& change : changes) {
    const json* path = field(change, {"Path", "path"});
    const json* kind = field(change, {"Kind", "kind"});
    char letter = '?';
    if (kind != nullptr && kind->is_number_integer()) {
      switch (kind->get<int>()) {
        case 0: letter = 'C'; break;  // modified, as `docker diff` prints it
        case 1: letter = 'A'; break;
        case 2: letter = 'D'; break;
        default: break;
      }
    }
    out += fmt::format("{} {}\n", letter, path != nullptr ? scalar_text(*path) : "");
  }
  return out;
}

std::string format_layers(const json& answer) {
  const json* list = &answer;
  if (answer.is_object()) {
    if (const json* inner = field(answer, {"layers", "Layers"})) list = inner;
  }
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"ID", "PARENT", "STATE", "MOUNTED", "REFS", "PID"});
  if (list->is_array()) {
    for (const auto& layer : *list) {
      auto text = [&](std::initializer_list<const char*> names) {
        const json* v = field(layer, names);
        return v != nullptr ? scalar_text(*v) : std::string();
      };
      std::string pid = text({"server_pid", "pid", "ServerPid"});
      if (pid == "0") pid = "-";
      std::string parent = text({"parent", "Parent"});
      rows.push_back({text({"id", "ID"}), parent.empty() ? "-" : parent, text({"state", "State"}),
                      text({"mounted", "Mounted"}), text({"refcount", "Refcount", "refs"}), pid});
    }
  }
  std::vector<std::size_t> widths(rows.front().size(), 0);
  for (const auto& row : rows) {
    for (std::size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (std::size_t i = 0; i < row.size(); ++i) {
      line += i + 1 < row.size() ? fmt::format("{:<{}}  ", row[i], widths[i]) : row[i];
    }
    out += trim(line) + "\n";
  }
  return out;
}

std::string format_event(const json& event) {
  if (!event.is_object()) return event.dump() + "\n";
  std::string when;
  if (const json* time = field(event, {"time", "Time"}); time != nullptr && time->is_number()) {
    double seconds = time->get<double>();
    auto whole = static_cast<std::time_t>(seconds);
    std::tm tm{};
    (void)localtime_r(&whole, &tm);
    char buf[32];
    (void)std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm);
    when = fmt::format("{}.{:03d}", buf, static_cast<int>((seconds - std::floor(seconds)) * 1000));
  } else if (time != nullptr) {
    when = scalar_text(*time);
  }
  auto text = [&](std::initializer_list<const char*> names) {
    const json* v = field(event, names);
    return v != nullptr ? scalar_text(*v) : std::string();
  };
  std::string out = fmt::format("{} {} {}", when, text({"type", "Type"}), text({"layer", "Layer"}));
  std::string detail = text({"detail", "Detail"});
  if (!detail.empty()) out += " " + detail;
  return trim(out) + "\n";
}

std::string format_bytes(double bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  while (bytes >= 1024 && unit < 4) {
    bytes /= 1024;
    ++unit;
  }
  return unit == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.1f} {}", bytes, kUnits[unit]);
}

std::string format_progress(std::uint64_t sent, std::optional<std::uint64_t> total,
                            double seconds) {
  double rate = seconds > 0 ? static_cast<double>(sent) / seconds : 0;
  if (total && *total > 0) {
    double fraction = std::min(1.0, static_cast<double>(sent) / static_cast<double>(*total));
    constexpr int kWidth = 30;
    int filled = static_cast<int>(fraction * kWidth);
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.append(static_cast<std::size_t>(kWidth - filled), '.');
    return fmt::format("[{}] {:3.0f}% {} / {}  {}/s", bar, fraction * 100,
                       format_bytes(static_cast<double>(sent)),
                       format_bytes(static_cast<double>(*total)), format_bytes(rate));
  }
  return fmt::format("{} sent  {}/s", format_bytes(static_cast<double>(sent)), format_bytes(rate));
}

}  // namespace layerctl
