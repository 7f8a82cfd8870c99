// A scripted HTTP/1.1 server on a real unix socket, for testing the tools' client side while the
// daemon is not involved: it parses each request with http-parser (so chunked uploads are
// decoded the way a real server would) and answers with the raw bytes a handler returns.
#pragma once

#include <http_parser.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace layerd::tools::testing {

struct RecordedRequest {
  std::string method;
  std::string url;
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
  bool chunked = false;
  int connection = 0;  // index of the connection it arrived on
};

// What the handler answers: raw bytes to send, and whether to close the connection afterwards.
struct ScriptedAnswer {
  std::string bytes;
  bool close = false;
};

inline std::string http_answer(int status, std::string_view body,
                               std::string_view content_type = "application/json") {
  std::string out = "HTTP/1.1 " + std::to_string(status) + " X\r\nContent-Type: ";
  out += content_type;
  out += "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n";
  out += body;
  return out;
}

class ScriptServer {
 public:
  using Handler = std::function<ScriptedAnswer(const RecordedRequest&)>;

  explicit ScriptServer(Handler handler) : handler_(std::move(handler)) {
    char dir_template[] = "/tmp/layerctl-test-XXXXXX";
    if (::mkdtemp(dir_template) == nullptr) throw std::runtime_error("mkdtemp failed");
    dir_ = dir_template;
    path_ = dir_ + "/s.sock";
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path_.c_str(), sizeof(addr.sun_path) - 1);
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        ::listen(listen_fd_, 64) != 0) {
      throw std::runtime_error("bind/listen failed");
    }
    thread_ = std::thread([this] { serve(); });
  }

  ~ScriptServer() {
    stopping_ = true;
    (void)::shutdown(listen_fd_, SHUT_RDWR);
    (void)::close(listen_fd_);
    thread_.join();
    std::filesystem::remove_all(dir_);
  }

  [[nodiscard]] const std::string& path() const { return path_; }
  [[nodiscard]] std::vector<RecordedRequest> requests() {
    std::lock_guard lock(mutex_);
    return requests_;
  }
  [[nodiscard]] int connections() const { return connections_; }

 private:
  struct Conn {
    http_parser parser{};
    RecordedRequest current;
    std::vector<RecordedRequest> complete;
    bool last_value = false;
  };

  static int on_url(http_parser* p, const char* at, size_t n) {
    static_cast<Conn*>(p->data)->current.url.append(at, n);
    return 0;
  }
  static int on_field(http_parser* p, const char* at, size_t n) {
    auto* c = static_cast<Conn*>(p->data);
    if (c->current.headers.empty() || c->last_value) c->current.headers.emplace_back();
    c->current.headers.back().first.append(at, n);
    c->last_value = false;
    return 0;
  }
  static int on_value(http_parser* p, const char* at, size_t n) {
    auto* c = static_cast<Conn*>(p->data);
    c->current.headers.back().second.append(at, n);
    c->last_value = true;
    return 0;
  }
  static int on_headers_done(http_parser* p) {
    auto* c = static_cast<Conn*>(p->data);
    c->current.method = http_method_str(static_cast<http_method>(p->method));
    c->current.chunked = (p->flags & F_CHUNKED) != 0;
    return 0;
  }
  static int on_body(http_parser* p, const char* at, size_t n) {
    static_cast<Conn*>(p->data)->current.body.append(at, n);
    return 0;
  }
  static int on_done(http_parser* p) {
    auto* c = static_cast<Conn*>(p->data);
    c->complete.push_back(std::move(c->current));
    c->current = RecordedRequest{};
    c->last_value = false;
    return 0;
  }

  void serve() {
    http_parser_settings settings{};
    http_parser_settings_init(&settings);
    settings.on_url = &on_url;
    settings.on_header_field = &on_field;
    settings.on_header_value = &on_value;
    settings.on_headers_complete = &on_headers_done;
    settings.on_body = &on_body;
    settings.on_message_complete = &on_done;
    while (!stopping_) {
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) return;
      int index = connections_++;
      Conn conn;
      http_parser_init(&conn.parser, HTTP_REQUEST);
      conn.parser.data = &conn;
      char buf[65536];
      bool open = true;
      while (open) {
        ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
        if (n <= 0) break;
        std::size_t used = http_parser_execute(&conn.parser, &settings, buf, static_cast<size_t>(n));
        if (conn.parser.http_errno != HPE_OK || used != static_cast<std::size_t>(n)) break;
        for (auto& request : conn.complete) {
          request.connection = index;
          {
            std::lock_guard lock(mutex_);
            requests_.push_back(request);
          }
          ScriptedAnswer answer = handler_(request);
          std::string_view out = answer.bytes;
          while (!out.empty()) {
            ssize_t w = ::send(fd, out.data(), out.size(), MSG_NOSIGNAL);
            if (w <= 0) break;
            out.remove_prefix(static_cast<std::size_t>(w));
          }
          if (answer.close) {
            open = false;
            break;
          }
        }
        conn.complete.clear();
      }
      (void)::close(fd);
    }
  }

  Handler handler_;
  std::string dir_;
  std::string path_;
  int listen_fd_ = -1;
  std::atomic<bool> stopping_{false};
  std::atomic<int> connections_{0};
  std::mutex mutex_;
  std::vector<RecordedRequest> requests_;
  std::thread thread_;
};

}  // namespace layerd::tools::testing
